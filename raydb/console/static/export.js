// Export: download a registered version's diffusers adapter (pytorch_lora_weights.safetensors, for
// diffusers' load_lora_weights) and, where it was exported, the single-file kohya LoRA (ComfyUI,
// AUTOMATIC1111, kohya's tools). Files come from GET /v1/subjects/<id>/versions/<v>/files/<name>
// with the key in the header, so a download is a fetch into a Blob that is then saved: the key
// never appears in a link.

import {getBlob, getJSON, seg} from "./api.js";
import {bytes, el, replace} from "./dom.js";

const FORMATS = {
  diffusers: ["Diffusers adapter", "For diffusers' load_lora_weights and raydb itself."],
  kohya: ["Kohya LoRA", "One file for ComfyUI, AUTOMATIC1111 and kohya's tools."],
};

export function render(root, args, ctx) {
  const state = {disposed: false};
  root.append(el("h2", {}, "Export"),
    el("p", {}, "Download a subject's adapter to use it outside raydb."));
  const subjectSelect = el("select", {id: "export-subject"});
  const versionSelect = el("select", {id: "export-version"});
  const downloads = el("div", {id: "export-files", "aria-live": "polite"});
  const line = el("p", {class: "status", role: "status"}, "Loading…");
  root.append(
    el("div", {class: "grid"},
      el("div", {class: "field"}, el("label", {for: "export-subject"}, "Subject"), subjectSelect),
      el("div", {class: "field"}, el("label", {for: "export-version"}, "Version"), versionSelect)),
    line, downloads);

  const showVersion = async (subjectId, version) => {
    replace(downloads);
    line.textContent = "Loading…";
    let meta;
    try {
      meta = await getJSON(`v1/subjects/${seg(subjectId)}${version ? `?version=${seg(version)}` : ""}`);
    } catch (err) {
      line.textContent = err.status === 404 ? `No subject ${subjectId} in your tenant.` : err.message;
      return;
    }
    if (state.disposed) return;
    line.textContent = "";
    replace(versionSelect, [...meta.versions].reverse().map((v) => el("option",
      {value: v.version, selected: v.version === meta.version},
      `${v.version}${v.version === meta.latest_version ? " (latest)" : ""}`)));
    const weights = meta.files.filter((f) => f.format);
    for (const f of weights) {
      const [title, about] = FORMATS[f.format] || [f.format, ""];
      const button = el("button", {type: "button", "data-file": f.name, id: `export-${f.format}`},
        `Download ${title} (${bytes(f.bytes)})`);
      const done = el("span", {class: "hint", role: "status"});
      button.addEventListener("click", async () => {
        button.disabled = true;
        done.textContent = " downloading…";
        try {
          const blob = await getBlob(`v1/subjects/${seg(subjectId)}/versions/${seg(meta.version)}/files/${seg(f.name)}`);
          const url = URL.createObjectURL(blob);
          const a = el("a", {href: url, download: `${subjectId}-${meta.version}-${f.name}`});
          document.body.append(a);
          a.click();
          a.remove();
          setTimeout(() => URL.revokeObjectURL(url), 60_000);
          done.textContent = " saved.";
        } catch (err) {
          done.textContent = ` failed: ${err.message}`;
        } finally {
          button.disabled = false;
        }
      });
      downloads.append(el("div", {class: "download"}, el("h3", {}, title), el("p", {class: "hint"}, about,
        ` File: ${f.name}.`), el("p", {}, button, done)));
    }
    if (!weights.some((f) => f.format === "kohya")) {
      downloads.append(el("p", {class: "hint", id: "export-no-kohya"},
        "No kohya file for this version. The operator can write one with “raydb export ",
        subjectId, ` --version ${meta.version}” or register every adapter with export_formats: [kohya].`));
    }
  };

  getJSON("v1/subjects").then(({subjects}) => {
    if (state.disposed) return;
    if (!subjects.length) {
      replace(line, "No subjects yet. ", el("a", {href: "#/train"}, "Train one"), ".");
      return;
    }
    const wanted = subjects.some((s) => s.subject_id === args[0]) ? args[0] : subjects[0].subject_id;
    replace(subjectSelect, subjects.map((s) => el("option", {value: s.subject_id,
      selected: s.subject_id === wanted}, s.subject_id)));
    showVersion(wanted, wanted === args[0] ? args[1] : undefined);
  }).catch((err) => { line.textContent = `Could not list subjects: ${err.message}`; });

  // in place, not by navigating: arrow keys on a select fire "change", and focus must stay on it
  subjectSelect.addEventListener("change", () => {
    history.replaceState(null, "", `#/export/${seg(subjectSelect.value)}`);
    showVersion(subjectSelect.value);
  });
  versionSelect.addEventListener("change", () => {
    history.replaceState(null, "", `#/export/${seg(subjectSelect.value)}/${seg(versionSelect.value)}`);
    showVersion(subjectSelect.value, versionSelect.value);
  });
  return {dispose: () => { state.disposed = true; }};
}
