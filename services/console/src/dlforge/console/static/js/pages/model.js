// Try the data set's optimized model: upload an image, see the decision, its confidence, every class's
// probability and the class activation map beside the image.
import { api } from "../api.js";
import { barChart } from "../charts.js";
import { clear, h } from "../dom.js";

export async function render(root, params) {
  const datasetId = params.datasetId;
  const file = h("input", { type: "file", id: "image", name: "file", accept: "image/*", required: true });
  const submit = h("button", { type: "submit", id: "predict" }, "Classify");
  const error = h("p", { class: "error", id: "model-error", role: "alert" });
  const result = h("div", { id: "prediction" });
  const urls = [];
  const form = h("form", { class: "card", id: "model-form" },
    h("label", { for: "image" }, "Image"), " ", file, " ", submit, error);

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    if (!file.files.length) { error.textContent = "Choose an image first."; return; }
    const picked = file.files[0];
    const fd = new FormData();
    fd.append("file", picked, picked.name);
    submit.disabled = true;
    try {
      const out = await api(`/optimizer/models/${encodeURIComponent(datasetId)}/predict?cam=true`, { method: "POST", form: fd });
      const own = URL.createObjectURL(picked);
      urls.push(own);
      const classes = Object.keys(out.probabilities || {});
      clear(result).append(
        h("div", { class: "card" },
          h("p", { class: "verdict met", id: "predicted" }, out.label, " — ",
            h("span", { id: "confidence" }, `${(100 * out.probability).toFixed(1)} %`)),
          out.positive_class ? h("p", { class: "wrap" },
            `${out.positive_class}: ${(100 * (out.positive_probability ?? 0)).toFixed(1)} % against the threshold `,
            `${out.threshold === null || out.threshold === undefined ? "—" : (100 * out.threshold).toFixed(1) + " %"}`,
            " (the positive class is decided when its probability reaches the threshold)") : null,
          h("p", { class: "muted wrap" }, `variant ${out.variant}, model ${out.model_id}; file ${picked.name}`)),
        h("div", { class: "grid2" },
          h("figure", { class: "chart" }, h("figcaption", {}, "The image"), h("img", { src: own, alt: picked.name, class: "sample", id: "input-image" })),
          out.cam_png
            ? h("figure", { class: "chart" }, h("figcaption", {}, `Class activation map for ${out.label}`),
              h("img", { src: `data:image/png;base64,${out.cam_png}`, alt: `class activation map for ${out.label}`, class: "sample", id: "cam" }))
            : h("p", { class: "muted", id: "no-cam" }, "The server sent no class activation map for this image."),
          barChart({ title: "Probability per class", categories: classes, yMax: 1, yFmt: (v) => `${Math.round(100 * v)} %`,
          valueFmt: (v) => `${(100 * v).toFixed(1)} %`, series: [{ name: "probability", values: classes.map((c) => out.probabilities[c]) }],
          colors: classes.map((c) => (c === out.label ? "#1f7a3a" : "#2457c5")), width: 420, height: 240 })));
    } catch (err) {
      error.textContent = `${err.status ? `${err.status}: ` : ""}${err.message}`;
    } finally {
      submit.disabled = false;
    }
  });

  root.append(h("h1", {}, "Model of data set ", h("span", { class: "mono" }, datasetId)),
    h("p", { class: "muted" }, "The data set's optimized model, with the threshold its run chose."), form, result);
  return () => urls.forEach((u) => URL.revokeObjectURL(u));
}
