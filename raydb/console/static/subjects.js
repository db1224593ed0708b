// Subjects: the tenant's subjects (GET /v1/subjects), and one subject's version in detail
// (GET /v1/subjects/<id>?version=…): base model, LoRA and training settings, final metrics from its
// adapter.json, and the run's pictures — samples.png (top row base model, bottom row with the
// adapter, same seeds) and loss_curve.png — fetched with the key and shown from blob: URLs.

import {getBlob, getJSON, seg} from "./api.js";
import {UrlBag, el, facts, num, replace} from "./dom.js";

// adapter.json's metric names, for people (unknown ones are shown as they are)
const METRICS = {
  loss: "Final loss", loss_instance: "Instance loss", loss_prior: "Prior loss", steps: "Steps",
  images_per_s: "Images/s", val_instance: "Validation, instance", val_prior: "Validation, prior",
  val_score: "Validation score", num_workers: "Workers", resumed_from: "Resumed from step",
};

const PICTURES = [
  ["samples.png", "Samples", "Top row: the base model; bottom row: with this adapter (same seeds and prompts)."],
  ["loss_curve.png", "Training loss", "The training loss per optimizer step."],
];

export function render(root, args, ctx) {
  const urls = new UrlBag();
  if (args.length) renderDetail(root, args[0], args[1], ctx, urls);
  else renderList(root, ctx);
  return {dispose: () => urls.revokeAll()};
}

function status(root) {
  const line = el("p", {class: "status", role: "status"}, "Loading…");
  root.append(line);
  return line;
}

async function renderList(root, ctx) {
  root.append(el("h2", {}, "Subjects"),
    el("p", {}, `The subjects of tenant ${ctx.limits.tenant}, newest version first. `,
      el("a", {href: "#/train"}, "Train a new one"), "."));
  const line = status(root);
  let rows;
  try {
    rows = (await getJSON("v1/subjects")).subjects;
  } catch (err) {
    line.textContent = `Could not list subjects: ${err.message}`;
    line.className = "error";
    return;
  }
  if (!rows.length) {
    replace(line, "No subjects yet. ", el("a", {href: "#/train"}, "Train your first subject"), ".");
    return;
  }
  line.remove();
  const list = el("ul", {class: "cards", id: "subject-list"});
  for (const row of rows) {
    list.append(el("li", {class: "card", "data-subject": row.subject_id},
      el("h3", {}, el("a", {href: `#/subjects/${seg(row.subject_id)}`}, row.subject_id)),
      facts([["Latest version", row.latest_version], ["Versions", row.versions.length],
        ["Base model family", row.family], ["Instance prompt", row.instance_prompt],
        ["Class prompt", row.class_prompt], ["Registered", row.registered_at]])));
  }
  root.append(list);
}

async function renderDetail(root, subjectId, version, ctx, urls) {
  root.append(el("h2", {}, subjectId),
    el("p", {}, el("a", {href: "#/subjects"}, "All subjects")));
  const line = status(root);
  let meta;
  try {
    meta = await getJSON(`v1/subjects/${seg(subjectId)}${version ? `?version=${seg(version)}` : ""}`);
  } catch (err) {
    line.textContent = err.status === 404 ? `No subject ${subjectId} in your tenant.`
      : `Could not load ${subjectId}: ${err.message}`;
    line.className = "error";
    return;
  }
  line.remove();
  const picker = el("select", {id: "subject-version"});
  for (const v of [...meta.versions].reverse()) {
    picker.append(el("option", {value: v.version, selected: v.version === meta.version},
      `${v.version}${v.version === meta.latest_version ? " (latest)" : ""}${v.registered_at ? ` · ${v.registered_at}` : ""}`));
  }
  // in place, not by navigating: arrow keys on a select fire "change", and focus must stay on it
  picker.addEventListener("change", async () => {
    history.replaceState(null, "", `#/subjects/${seg(subjectId)}/${seg(picker.value)}`);
    urls.revokeAll();
    root.replaceChildren();
    await renderDetail(root, subjectId, picker.value, ctx, urls);
    document.getElementById("subject-version")?.focus();
  });
  const training = meta.training || {};
  const metrics = meta.metrics || {};
  const tune = meta.tune || null;
  root.append(
    el("div", {class: "field"}, el("label", {for: "subject-version"}, "Version"), picker),
    el("p", {class: "actions"},
      el("a", {class: "button", href: `#/generate/${seg(subjectId)}`}, "Generate with it"), " ",
      el("a", {class: "button secondary", href: `#/export/${seg(subjectId)}/${seg(meta.version)}`}, "Downloads")),
    el("div", {class: "columns"},
      el("section", {"aria-labelledby": "subject-model"}, el("h3", {id: "subject-model"}, "Model"),
        facts([["Base model family", meta.base_model?.family],
          ["Prediction", meta.base_model?.prediction_type], ["LoRA rank", meta.lora?.rank],
          ["LoRA alpha", num(meta.lora?.alpha)], ["Instance prompt", meta.subject?.instance_prompt],
          ["Class prompt", meta.subject?.class_prompt], ["Instance token", meta.subject?.instance_token],
          ["Created", meta.created_at]])),
      el("section", {"aria-labelledby": "subject-training"}, el("h3", {id: "subject-training"}, "Training"),
        facts([["Steps", training.max_steps], ["Learning rate", num(training.learning_rate)],
          ["Prior loss weight", num(training.prior_loss_weight)], ["Resolution", training.resolution],
          ["Batch size", training.batch_size], ["Prior images", training.prior_enabled ? training.num_class_images : "off"],
          ["Workers", training.num_workers], ["Seed", training.seed]])),
      el("section", {"aria-labelledby": "subject-metrics"}, el("h3", {id: "subject-metrics"}, "Metrics"),
        facts(Object.entries(metrics).map(([k, v]) => [METRICS[k] || k, num(v)]), {id: "subject-metrics-list"}),
        tune ? facts([...Object.entries(tune.hyperparameters || {}), ...Object.entries(tune.validation || {})]
          .map(([k, v]) => [`search: ${k}`, num(v)])) : null)));
  const names = new Set(meta.files.map((f) => f.name));
  const gallery = el("div", {class: "pictures"});
  root.append(gallery);
  for (const [name, title, caption] of PICTURES) {
    if (!names.has(name)) {
      gallery.append(el("p", {class: "hint"}, `${title}: this version has no ${name}.`));
      continue;
    }
    const img = el("img", {alt: `${title} of ${subjectId} ${meta.version}`, "data-file": name});
    gallery.append(el("figure", {}, img, el("figcaption", {}, el("strong", {}, title), " — ", caption)));
    getBlob(`v1/subjects/${seg(subjectId)}/versions/${seg(meta.version)}/files/${seg(name)}`)
      .then((blob) => { img.src = urls.add(blob); })
      .catch((err) => img.replaceWith(el("p", {class: "error"}, `${name}: ${err.message}`)));
  }
}
