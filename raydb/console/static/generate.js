// Generate and compare: one prompt, seed and set of settings (within the server's limits from
// GET /v1/limits), sent once per ticked model — the base model alone and/or any of the tenant's
// subjects — as concurrent POST /v1/generate requests, which the serving engine batches into one
// denoising loop. The results sit side by side, newest run first; the seed is drawn here when left
// blank, so every model of a run shares it.

import {getJSON, pngBlob, randomSeed, request} from "./api.js";
import {UrlBag, el, field, replace, setFieldError} from "./dom.js";

const BASE = ""; // the model key of "no adapter"

export function render(root, args, ctx) {
  const urls = new UrlBag();
  const g = ctx.limits.generate;
  const state = {disposed: false, runs: 0};

  root.append(el("h2", {}, "Generate"),
    el("p", {}, "Tick one model to generate, or several to compare them on the same prompt and seed."));

  const prompt = field({id: "gen-prompt", label: "Prompt",
    input: el("textarea", {rows: 2, maxlength: g.max_prompt_chars}),
    hint: `Up to ${g.max_prompt_chars} characters. A subject's instance token is added when missing.`});
  const negative = field({id: "gen-negative", label: "Negative prompt (optional)",
    input: el("textarea", {rows: 1, maxlength: g.max_prompt_chars})});
  const models = el("fieldset", {id: "gen-models"}, el("legend", {}, "Models"));
  const modelsError = el("p", {class: "field-error", id: "gen-models-error"});
  const baseBox = modelCheckbox(BASE, "gen-model-base", "Base model (no adapter)");
  models.append(baseBox.row, el("p", {class: "hint", id: "gen-models-loading"}, "Loading your subjects…"));

  const seed = field({id: "gen-seed", label: "Seed",
    input: el("input", {type: "number", min: 0, step: 1, inputmode: "numeric"}),
    hint: "Blank: a random seed, the same for every model of the run."});
  const steps = field({id: "gen-steps", label: "Steps",
    input: el("input", {type: "number", min: 1, max: g.max_inference_steps, step: 1,
      value: Math.min(g.default_inference_steps, g.max_inference_steps)}),
    hint: `1–${g.max_inference_steps}`});
  const width = field({id: "gen-width", label: "Width",
    input: el("input", {type: "number", min: 8, max: g.max_size, step: 8, placeholder: "model's"}),
    hint: `Multiple of 8, up to ${g.max_size}; blank: the model's size.`});
  const height = field({id: "gen-height", label: "Height",
    input: el("input", {type: "number", min: 8, max: g.max_size, step: 8, placeholder: "model's"}),
    hint: `Multiple of 8, up to ${g.max_size}.`});
  const guidance = field({id: "gen-guidance", label: "Guidance",
    input: el("input", {type: "number", min: 0, max: 50, step: 0.5, value: 7.5}),
    hint: "0–50: how strongly the image follows the prompt."});
  const count = field({id: "gen-count", label: "Images per model",
    input: el("input", {type: "number", min: 1, max: g.max_images, step: 1, value: 1}),
    hint: `1–${g.max_images}`});
  const submit = el("button", {type: "submit", id: "gen-submit"}, "Generate");
  const formError = el("p", {class: "error", id: "gen-error", role: "alert"});
  const form = el("form", {id: "gen-form", novalidate: true, method: "post"},
    prompt.row, negative.row, models, modelsError,
    el("div", {class: "grid"}, seed.row, steps.row, width.row, height.row, guidance.row, count.row),
    submit, formError);
  const gallery = el("section", {id: "gallery", "aria-labelledby": "gallery-title"},
    el("h3", {id: "gallery-title"}, "Results"),
    el("p", {class: "hint", id: "gallery-empty"}, "Nothing generated yet."));
  root.append(form, gallery);

  const boxes = [baseBox];
  getJSON("v1/subjects").then(({subjects}) => {
    if (state.disposed) return;
    document.getElementById("gen-models-loading")?.remove();
    if (!subjects.length) models.append(el("p", {class: "hint"}, "No subjects yet: only the base model."));
    subjects.forEach((s, i) => {
      const box = modelCheckbox(s.subject_id, `gen-model-${i}`, `${s.subject_id} (${s.latest_version}`
        + `${s.instance_token ? `, token ${s.instance_token}` : ""})`,
        args[0] ? s.subject_id === args[0] : i === 0);
      boxes.push(box);
      models.append(box.row);
    });
    if (!subjects.length) baseBox.input.checked = true;
  }).catch((err) => {
    replace(document.getElementById("gen-models-loading") || models,
      `Could not list subjects: ${err.message}`);
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = {prompt, negative_prompt: negative, seed, num_inference_steps: steps, width, height,
      guidance_scale: guidance, num_images: count};
    for (const f of Object.values(fields)) setFieldError(f, "");
    modelsError.textContent = "";
    formError.textContent = "";
    if (!prompt.input.value.trim()) {
      setFieldError(prompt, "Enter a prompt.");
      prompt.input.focus();
      return;
    }
    const chosen = boxes.filter((b) => b.input.checked);
    if (!chosen.length) {
      modelsError.textContent = "Tick at least one model.";
      baseBox.input.focus();
      return;
    }
    const body = {prompt: prompt.input.value,
      seed: seed.input.value === "" ? randomSeed() : Number(seed.input.value),
      num_inference_steps: Number(steps.input.value), guidance_scale: Number(guidance.input.value),
      num_images: Number(count.input.value)};
    if (negative.input.value.trim()) body.negative_prompt = negative.input.value;
    if (width.input.value !== "") body.width = Number(width.input.value);
    if (height.input.value !== "") body.height = Number(height.input.value);

    document.getElementById("gallery-empty")?.remove();
    state.runs += 1;
    const run = el("article", {class: "run", "data-run": state.runs, "data-seed": body.seed, "aria-busy": "true"},
      el("h4", {}, `Run ${state.runs}: “${body.prompt}”`),
      el("p", {class: "hint"}, `seed ${body.seed} · ${body.num_inference_steps} steps · guidance `
        + `${body.guidance_scale}${body.width || body.height ? ` · ${body.width ?? "auto"}×${body.height ?? "auto"}` : ""}`));
    const columns = el("div", {class: "compare"});
    run.append(columns);
    gallery.querySelector("h3").after(run);
    submit.disabled = true;
    // one request per model, all at once: the engine batches requests of one shape
    const results = await Promise.allSettled(chosen.map((box) => {
      const figure = el("figure", {class: "model", "data-model": box.model || "base"},
        el("figcaption", {}, el("strong", {}, box.model || "Base model"), " — generating…"));
      columns.append(figure);
      const payload = box.model ? {...body, subject_id: box.model} : body;
      return request("POST", "v1/generate", {json: payload}).then((r) => r.json())
        .then((answer) => showImages(figure, box, answer), (err) => { showError(figure, box, err); throw err; });
    }));
    run.removeAttribute("aria-busy");
    submit.disabled = false;
    const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason);
    for (const err of failed) {
      for (const [name, msg] of Object.entries(err.fields || {})) if (fields[name]) setFieldError(fields[name], msg);
    }
    if (failed.length) formError.textContent = `${failed.length} of ${results.length} requests failed; see the results.`;
  });

  function showImages(figure, box, answer) {
    const caption = el("figcaption", {},
      el("strong", {}, box.model ? `${answer.subject_id} ${answer.adapter_version}` : "Base model"),
      " — ", el("span", {class: "prompt-used"}, answer.prompt),
      answer.prompt_rewritten ? el("span", {class: "hint"}, " (instance token added)") : null);
    const images = answer.images.map((b64, i) => {
      const img = el("img", {alt: `${box.model || "base model"}, image ${i + 1}: ${answer.prompt}`,
        width: answer.width, height: answer.height, "data-width": answer.width, "data-height": answer.height});
      img.src = urls.add(pngBlob(b64));
      return img;
    });
    replace(figure, el("div", {class: "images"}, images), caption);
    figure.dataset.state = "done";
  }

  function showError(figure, box, err) {
    replace(figure, el("p", {class: "error"}, err.message),
      el("figcaption", {}, el("strong", {}, box.model || "Base model"), " — failed"));
    figure.dataset.state = "error";
  }

  return {dispose: () => { state.disposed = true; urls.revokeAll(); }};
}

function modelCheckbox(model, id, label, checked = false) {
  const input = el("input", {type: "checkbox", id, value: model, checked});
  return {model, input, row: el("div", {class: "check", "data-model": model || "base"}, input,
    el("label", {for: id}, label))};
}
