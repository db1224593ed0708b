// Train: photos (chosen or dropped, each checked by POST /v1/photo-checks — the API's own byte,
// pixel and decoding checks — with its problem shown beside it), the prompts, the training settings
// the operator lets tenants override (from GET /v1/limits, with their bounds), then
// POST /v1/trainings with an Idempotency-Key, and a live view polling GET /v1/trainings/<id>
// (stage, step/max, loss, images/s, ETA) with Cancel (DELETE).

import {ApiError, getJSON, randomKey, request, seg} from "./api.js";
import {UrlBag, bytes, duration, el, facts, field, num, replace, setFieldError} from "./dom.js";

const POLL_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function render(root, args, ctx) {
  const urls = new UrlBag();
  const state = {photos: [], idempotencyKey: randomKey(), poll: null, disposed: false, watching: null};
  const t = ctx.limits.training;

  root.append(el("h2", {}, "Train a subject"),
    el("p", {}, `Upload ${t.max_photos > 1 ? `1 to ${t.max_photos}` : "1"} photos of one subject `
      + "(3–20 work best: different backgrounds, poses and light), name it, and describe it."));

  const subject = field({id: "train-subject", label: "Subject id",
    input: el("input", {type: "text", autocomplete: "off", spellcheck: "false", maxlength: 64,
      pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}"}),
    hint: "Letters, digits, '.', '_' and '-' (up to 64); becomes the subject's registry id."});
  const instance = field({id: "train-instance-prompt", label: "Instance prompt",
    input: el("input", {type: "text", autocomplete: "off", maxlength: t.max_prompt_chars}),
    hint: "A rare token plus the class noun, e.g. “a photo of sks dog”."});
  const klass = field({id: "train-class-prompt", label: "Class prompt",
    input: el("input", {type: "text", autocomplete: "off", maxlength: t.max_prompt_chars}),
    hint: "The same without the token, e.g. “a photo of a dog”."});

  const fileInput = el("input", {type: "file", multiple: true,
    accept: t.photo_formats.map((f) => `.${f}`).join(",")});
  const photos = field({id: "train-photos", label: "Photos", input: fileInput,
    hint: `${t.photo_formats.join(", ")}; each at most ${bytes(t.max_photo_bytes)} and `
      + `${(t.max_photo_pixels / 1e6).toFixed(0)} megapixels, shorter side at least ${t.min_photo_side} px.`});
  const drop = el("div", {class: "dropzone", id: "train-drop"}, photos.row,
    el("p", {class: "hint", "aria-hidden": "true"}, "…or drop photos here."));
  const photoList = el("ul", {class: "photos", id: "train-photo-list", "aria-label": "Chosen photos"});

  const overrideFields = t.overrides.map((o) => overrideField(o));
  const settings = el("fieldset", {id: "train-settings"},
    el("legend", {}, "Training settings (the ones your operator allows)"),
    ...overrideFields.map((f) => f.row));
  const settingsError = el("p", {class: "field-error", id: "train-settings-error"});
  settings.append(settingsError);

  const submit = el("button", {type: "submit", id: "train-submit"}, "Start training");
  const formError = el("p", {class: "error", id: "train-error", role: "alert"});
  const form = el("form", {id: "train-form", novalidate: true, method: "post"},
    subject.row, instance.row, klass.row, drop, photoList,
    overrideFields.length ? settings : null, submit, formError);
  const live = el("section", {id: "training-live", class: "live", "aria-labelledby": "training-live-title",
    hidden: true});
  const recent = el("section", {id: "training-recent", "aria-labelledby": "training-recent-title"},
    el("h3", {id: "training-recent-title"}, "Your trainings"));
  root.append(live, form, recent);

  // -- photos ---------------------------------------------------------------------------------
  const addFiles = async (files) => {
    const fresh = [...files].filter((f) => !state.photos.some((p) => p.file.name === f.name
      && p.file.size === f.size && p.file.lastModified === f.lastModified));
    if (!fresh.length) return;
    if (state.photos.length + fresh.length > t.max_photos) {
      setFieldError(photos, `At most ${t.max_photos} photos; remove some first.`);
      return;
    }
    setFieldError(photos, "");
    const added = fresh.map((file) => ({file, url: urls.add(file), status: "checking", message: ""}));
    state.photos.push(...added);
    drawPhotos();
    const body = new FormData();
    for (const p of added) body.append("photos", p.file, p.file.name);
    const resolution = overrideFields.find((f) => f.key === "train.resolution");
    if (resolution && resolution.input.value) body.append("resolution", resolution.input.value);
    try {
      const result = await (await request("POST", "v1/photo-checks", {form: body})).json();
      result.photos.forEach((r, i) => Object.assign(added[i], r.ok
        ? {status: "ok", message: `${r.width}×${r.height}`} : {status: "error", message: r.error}));
    } catch (err) {
      for (const p of added) Object.assign(p, {status: "error", message: err.message});
    }
    if (!state.disposed) drawPhotos();
  };

  function drawPhotos() {
    replace(photoList, state.photos.map((p, i) => {
      const remove = el("button", {type: "button", class: "link", "aria-label": `Remove ${p.file.name}`},
        "Remove");
      remove.addEventListener("click", () => {
        state.photos.splice(i, 1);
        drawPhotos();
        fileInput.focus();
      });
      const img = el("img", {alt: p.file.name, width: 72, height: 72});
      img.src = p.url;
      return el("li", {class: `photo ${p.status}`, "data-status": p.status},
        img, el("span", {class: "photo-name"}, p.file.name),
        el("span", {class: "photo-size"}, bytes(p.file.size)),
        el("span", {class: p.status === "error" ? "photo-msg error" : "photo-msg"},
          p.status === "checking" ? "checking…" : p.status === "ok" ? `✓ ${p.message}` : p.message),
        remove);
    }));
  }

  fileInput.addEventListener("change", () => {
    addFiles(fileInput.files);
    fileInput.value = "";
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });

  // -- submit ---------------------------------------------------------------------------------
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const f of [subject, instance, klass, photos]) setFieldError(f, "");
    settingsError.textContent = "";
    formError.textContent = "";
    const problems = [];
    for (const [f, name] of [[subject, "Subject id"], [instance, "Instance prompt"], [klass, "Class prompt"]]) {
      if (!f.input.value.trim()) { setFieldError(f, `${name} is required.`); problems.push(f.input); }
    }
    if (!state.photos.length) { setFieldError(photos, "Add at least one photo."); problems.push(fileInput); }
    const bad = state.photos.filter((p) => p.status === "error");
    if (bad.length) {
      setFieldError(photos, `Remove the photos with problems first (${bad.map((p) => p.file.name).join(", ")}).`);
      problems.push(fileInput);
    }
    if (problems.length) { problems[0].focus(); return; }

    const body = new FormData();
    body.append("subject_id", subject.input.value.trim());
    body.append("instance_prompt", instance.input.value);
    body.append("class_prompt", klass.input.value);
    const overrides = {};
    for (const f of overrideFields) {
      const value = f.value();
      if (value !== undefined && value !== f.default) overrides[f.key] = value;
    }
    if (Object.keys(overrides).length) body.append("overrides", JSON.stringify(overrides));
    for (const p of state.photos) body.append("photos", p.file, p.file.name);
    submit.disabled = true;
    try {
      const view = await (await request("POST", "v1/trainings", {form: body,
        headers: {"Idempotency-Key": state.idempotencyKey}})).json();
      state.idempotencyKey = randomKey();
      ctx.navigate(`#/train/${seg(view.id)}`);
    } catch (err) {
      const byField = {subject_id: subject, instance_prompt: instance, class_prompt: klass, photos,
        photo_uris: photos};
      let first = null;
      for (const [name, msg] of Object.entries(err.fields || {})) {
        if (byField[name]) { setFieldError(byField[name], msg); first ||= byField[name].input; }
        if (name === "overrides") { settingsError.textContent = msg; first ||= overrideFields[0]?.input; }
      }
      formError.textContent = first ? "The server refused the training; see the messages above."
        : `The server refused the training: ${err.message}`;
      first?.focus();
    } finally {
      submit.disabled = false;
    }
  });

  // -- live view ------------------------------------------------------------------------------
  const watch = async (trainingId) => {
    live.hidden = false;
    const title = el("h3", {id: "training-live-title"}, `Training ${trainingId}`);
    const progress = el("progress", {id: "training-progress", max: 1, value: 0,
      "aria-labelledby": "training-live-title"});
    const body = el("div", {id: "training-facts", "aria-live": "polite"});
    const cancel = el("button", {type: "button", id: "training-cancel", class: "secondary"}, "Cancel training");
    const after = el("p", {class: "actions", id: "training-next"});
    replace(live, title, progress, body, cancel, after);
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        draw(await (await request("DELETE", `v1/trainings/${seg(trainingId)}`)).json());
      } catch (err) {
        body.append(el("p", {class: "error", role: "alert"}, `Cancel refused: ${err.message}`));
        cancel.disabled = false;
      }
    });
    const draw = (v) => {
      live.dataset.status = v.status;
      progress.max = v.max_steps || 1;
      progress.value = v.step || 0;
      replace(body, facts([
        ["Subject", v.subject_id], ["Status", v.status], ["Stage", v.stage],
        ["Step", v.max_steps ? `${v.step ?? 0} / ${v.max_steps}` : v.step],
        ["Loss", num(v.loss)], ["Images/s", num(v.images_per_s)], ["Time left", duration(v.eta_s)],
        ["Trials", v.trials ? `${v.trials.started} of ${v.trials.planned} started` : null],
        ["Error", v.error]], {id: "training-status"}));
      if (TERMINAL.has(v.status)) {
        cancel.hidden = true;
        if (v.status === "succeeded" && v.subject) {
          replace(after,
            el("a", {class: "button", href: `#/subjects/${seg(v.subject.subject_id)}/${seg(v.subject.version)}`,
              id: "training-see-subject"}, `See ${v.subject.subject_id} ${v.subject.version}`), " ",
            el("a", {class: "button secondary", href: `#/generate/${seg(v.subject.subject_id)}`}, "Generate with it"));
        }
      }
    };
    const tick = async () => {
      if (state.disposed) return;
      try {
        const v = await getJSON(`v1/trainings/${seg(trainingId)}`);
        draw(v);
        if (TERMINAL.has(v.status)) { loadRecent(); return; }
      } catch (err) {
        if (err instanceof ApiError && err.status === 404) {
          replace(body, el("p", {class: "error"}, `No training ${trainingId} in your tenant.`));
          cancel.hidden = true;
          return;
        }
        body.append(el("p", {class: "hint"}, `(retrying: ${err.message})`));
      }
      state.poll = setTimeout(tick, POLL_MS);
    };
    tick();
  };

  const loadRecent = async () => {
    try {
      const rows = (await getJSON("v1/trainings")).trainings;
      rows.sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
      const list = el("ul", {class: "recent"});
      for (const v of rows.slice(0, 10)) {
        list.append(el("li", {}, el("a", {href: `#/train/${seg(v.id)}`}, v.subject_id), ` — ${v.status}`,
          v.max_steps ? `, step ${v.step ?? 0}/${v.max_steps}` : "", v.created_at ? ` · ${v.created_at}` : ""));
      }
      replace(recent, el("h3", {id: "training-recent-title"}, "Your trainings"),
        rows.length ? list : el("p", {class: "hint"}, "None yet."));
    } catch (err) {
      recent.append(el("p", {class: "error"}, `Could not list trainings: ${err.message}`));
    }
  };

  if (args[0]) watch(args[0]);
  loadRecent();
  return {dispose: () => { state.disposed = true; clearTimeout(state.poll); urls.revokeAll(); }};
}

/** A form control for one allowed override, from its JSON-schema-like description in /v1/limits. */
function overrideField(o) {
  const id = `train-${o.key.replace(/[^A-Za-z0-9]+/g, "-")}`;
  if (o.type === "boolean") {
    const input = el("input", {type: "checkbox", id, checked: Boolean(o.default)});
    const row = el("div", {class: "field check"}, input, el("label", {for: id}, o.label),
      el("p", {class: "hint", id: `${id}-hint`}, o.description));
    input.setAttribute("aria-describedby", `${id}-hint`);
    return {key: o.key, input, row, default: Boolean(o.default), value: () => input.checked};
  }
  if (o.enum) {  // a choice (prior.mode: images | model): a select, its value the chosen string
    const input = el("select", {id}, ...o.enum.map((v) => el("option", {value: v, selected: v === o.default}, v)));
    const f = field({id, label: o.label, input, hint: `default ${o.default}. ${o.description || ""}`});
    return {key: o.key, input, row: f.row, default: o.default, value: () => input.value};
  }
  const integer = o.type === "integer";
  const input = el("input", {type: "number", inputmode: integer ? "numeric" : "decimal",
    step: integer ? 1 : "any", min: o.minimum ?? o.exclusive_minimum, max: o.maximum, value: o.default});
  const bounds = [o.minimum !== undefined && o.minimum !== null ? `≥ ${o.minimum}` : null,
    o.exclusive_minimum !== undefined && o.exclusive_minimum !== null ? `> ${o.exclusive_minimum}` : null,
    o.maximum !== undefined && o.maximum !== null ? `≤ ${o.maximum}` : null].filter(Boolean).join(", ");
  const f = field({id, label: o.label, input,
    hint: `${bounds ? `${bounds}; ` : ""}default ${o.default}. ${o.description || ""}`});
  return {key: o.key, input, row: f.row, default: o.default,
    value: () => (input.value === "" ? undefined : integer ? parseInt(input.value, 10) : Number(input.value))};
}
