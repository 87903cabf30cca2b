// PSA for ComfyUI: frontend extension.
//  - PSA Loader: the preset list shows the chosen section's presets ('auto': every section's).
//  - PSA Preset Editor: a read-only preview of the incoming preset's values, updated when the
//    connected Loader changes, and the editor's result after a run.
//  - Chinese labels next to the pack's combo values (keep, incoming, auto, default, ...) when the
//    interface language is Chinese, on the node and in the dropdown list; the values stored in
//    workflows and prompts stay the English keys.
//  - PSA Plan View: a new node draws its picture in the interface's language (saved in the workflow).
//  - Problems met while reading the presets files show as a warning toast, in the UI's language.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PSA_NODES = new Set(["PSALoader", "PSAPresetEditor", "ApplyPSA", "PSAPlanView"]);
const ZH_LABELS = {
  keep: "保持", incoming: "沿用输入", auto: "自动识别", default: "默认", baseline: "全注意力基线",
  true: "是", false: "否", psa: "稀疏注意力", dense: "全注意力", thresholdbound: "累积质量界限",
  topk: "固定份额", Gilbert: "Gilbert 曲线", Tiled: "分块", off: "关闭",
  sampled: "采样估计", block_mean: "块均值估计", new_mask_type: "新掩码格式", old_mask_type: "旧掩码格式",
  none: "不修正", variance: "方差修正",
};
const zhLabel = (v) => (ZH_LABELS[v] ? `${ZH_LABELS[v]} (${v})` : v);
const PLAN_LANGUAGE = { zh: "中文", en: "English" };  // PSA Plan View's language values
const PREVIEW = "psa_preview";

let library = null;      // {sections: {name: {default, presets: {name: fields}}}, problems: [{en, zh}]}
let loading = null;

function locale() {
  const get = app.extensionManager?.setting?.get ?? app.ui?.settings?.getSettingValue?.bind(app.ui.settings);
  return String((get && get("Comfy.Locale")) || navigator.language || "en");
}
const isZh = () => locale().toLowerCase().startsWith("zh");

async function loadLibrary(force = false) {
  if (library && !force) return library;
  if (!loading || force) {
    loading = api.fetchApi("/psa/presets").then((r) => (r.ok ? r.json() : null)).catch(() => null);
  }
  library = await loading;
  return library;
}

// Preset names a Loader offers for a section; null when the library is not known.
export function presetsFor(lib, section) {
  if (!lib) return null;
  const names = new Set(["default"]);
  const sections = section === "auto" ? Object.values(lib.sections) : [lib.sections[section]].filter(Boolean);
  for (const s of sections) for (const name of Object.keys(s.presets)) names.add(name);
  return [...names];
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function chain(obj, key, fn) {
  const prev = obj[key];
  obj[key] = function (...args) {
    const r = prev?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

// On ComfyUI versions with DynamicCombo the Loader's section is one, and the frontend itself shows
// the section's own preset widget ("model_section.preset"); the flat "preset" is then hidden and
// only there for older prompts: nothing to filter, only the editors to refresh.
function dynamicSection(node) {
  return node.constructor?.nodeData?.input?.required?.model_section?.[0] === "COMFY_DYNAMICCOMBO_V3";
}

function filterLoader(node) {
  const section = widget(node, "model_section");
  const preset = widget(node, "preset");
  if (section && dynamicSection(node)) {
    chain(section, "callback", () => refreshEditorsOf(node));
    chain(node, "onWidgetChanged", (name) => {
      if (String(name).startsWith("model_section.")) refreshEditorsOf(node);
    });
    return;
  }
  if (!section || !preset || section.type !== "combo") return;
  const update = () => {
    const names = presetsFor(library, section.value);
    if (!names) return;
    // A saved workflow's preset that the section lacks stays selected (and listed), so nothing the
    // user chose is lost; running it then names the allowed presets.
    if (!names.includes(preset.value)) names.push(preset.value);
    preset.options.values = names;
    node.setDirtyCanvas?.(true, true);
    refreshEditorsOf(node);
  };
  chain(section, "callback", update);
  chain(preset, "callback", () => refreshEditorsOf(node));
  loadLibrary().then(update);
}

// The Loader feeding an editor's psa_config input, if any.
function sourceLoader(editor) {
  const input = editor.inputs?.find((i) => i.name === "psa_config");
  if (!input || input.link == null) return null;
  const link = app.graph.links[input.link] ?? app.graph.links.get?.(input.link);
  const node = link && app.graph.getNodeById(link.origin_id);
  return node?.comfyClass === "PSALoader" || node?.type === "PSALoader" ? node : null;
}

function yamlLines(fields, indent = "  ") {
  const out = [];
  for (const [k, v] of Object.entries(fields)) {
    if (v && typeof v === "object" && !Array.isArray(v)) {
      out.push(`${indent}${k}:`);
      out.push(...yamlLines(v, indent + "  "));
    } else {
      out.push(`${indent}${k}: ${Array.isArray(v) ? `[${v.join(", ")}]` : v}`);
    }
  }
  return out;
}

function incomingText(editor) {
  const zh = isZh();
  const loader = sourceLoader(editor);
  if (!loader) return zh ? "（输入值：连接 PSA 加载器后显示）" : "(incoming values: shown when a PSA Loader is connected)";
  const section = widget(loader, "model_section")?.value;
  let name = (widget(loader, "model_section.preset") ?? widget(loader, "preset"))?.value;
  if (!library) return "…";
  if (section === "auto") {
    return zh ? "模型节为 auto：运行后显示实际输入值" : "section auto: the incoming values show after a run";
  }
  const s = library.sections[section];
  if (!s) return `${section}: ?`;
  if (name === "default") name = s.default;
  const fields = s.presets[name];
  if (!fields) return zh ? `'${name}' 不是模型节 ${section} 的预设` : `'${name}' is not a preset of ${section}`;
  return [`# ${zh ? "输入预设" : "incoming"}: ${section}/${name}`, ...yamlLines(fields, "")].join("\n");
}

function previewWidget(node) {
  let w = widget(node, PREVIEW);
  if (w) return w;
  const area = document.createElement("textarea");
  area.readOnly = true;
  area.className = "comfy-multiline-input";
  area.style.fontSize = "11px";
  area.style.opacity = "0.85";
  w = node.addDOMWidget(PREVIEW, "psa_preview", area, {
    getValue: () => area.value, setValue: () => {}, serialize: false, getMinHeight: () => 150,
  });
  w.serialize = false;  // not in widgets_values: workflows keep their layout
  w.options.serialize = false;  // not in the prompt
  w.element = area;
  return w;
}

function refreshEditor(editor) {
  const w = previewWidget(editor);
  if (!editor.psaRan) w.element.value = incomingText(editor);
}

function refreshEditorsOf(loader) {
  for (const out of loader.outputs ?? []) {
    for (const id of out.links ?? []) {
      const link = app.graph.links[id] ?? app.graph.links.get?.(id);
      const node = link && app.graph.getNodeById(link.target_id);
      if (node?.comfyClass === "PSAPresetEditor") {
        node.psaRan = false;
        refreshEditor(node);
      }
    }
  }
}

// Chinese label beside the stored value, on the node and in the dropdown list. This frontend's
// combo widget (litegraph's ComboWidget, frontend 1.27) has no option-label hook: it draws
// `_displayValue` and opens a LiteGraph.ContextMenu of the raw values. So, for the PSA nodes'
// combos only, `_displayValue` is overridden on the widget, and after a click the entries of the
// menu it opened get their label as text; each entry keeps its value, so choosing one stores the
// English key. The editor's level-range text fields show their `keep` / `off` the same way (the
// text to edit stays the value).
const TEXT_LABELLED = new Set(["keep", "off"]);
function labelValues(node) {
  if (!isZh()) return;
  for (const w of node.widgets ?? []) {
    const text = w.type === "string" || w.type === "text";
    if (w.type !== "combo" && !text) continue;
    Object.defineProperty(w, "_displayValue", {
      configurable: true,
      get() {
        const v = String(this.value);
        return this.computedDisabled ? "" : !text || TEXT_LABELLED.has(v) ? zhLabel(v) : v;
      },
    });
    if (text) continue;
    const click = w.onClick;
    if (typeof click !== "function") continue;
    w.onClick = function (...args) {
      const before = new Set(document.querySelectorAll(".litecontextmenu"));
      const r = click.apply(this, args);
      for (const menu of document.querySelectorAll(".litecontextmenu")) {
        if (before.has(menu)) continue;
        for (const entry of menu.querySelectorAll(".litemenu-entry")) {
          const v = entry.dataset.value;
          if (v !== undefined && ZH_LABELS[v]) entry.textContent = zhLabel(v);
        }
      }
      return r;
    };
  }
}

async function warnProblems() {
  const lib = await loadLibrary();
  if (!lib?.problems?.length) return;
  const zh = isZh();
  const detail = lib.problems.map((p) => (zh ? p.zh : p.en)).join("\n");
  const summary = zh ? "PSA：部分预设未能加载（其余照常可用）" : "PSA: some presets could not be loaded (the rest still work)";
  app.extensionManager?.toast?.add({ severity: "warn", summary, detail, life: 20000 });
  console.warn("[PSA]", summary, "\n" + detail);
}

app.registerExtension({
  name: "psa.comfyui",
  async setup() {
    await warnProblems();
    api.addEventListener("executed", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail?.node) || detail?.node);
      const text = detail?.output?.text;
      if (node?.comfyClass === "PSAPresetEditor" && text) {
        node.psaRan = true;
        previewWidget(node).element.value = [].concat(text).join("\n");
      }
    });
  },
  async nodeCreated(node) {
    const kind = node.comfyClass;
    if (!PSA_NODES.has(kind)) return;
    labelValues(node);
    if (kind === "PSALoader") filterLoader(node);
    if (kind === "PSAPlanView") {
      // a node made now takes the interface's language; a loaded workflow's saved value replaces it
      const language = widget(node, "language");
      if (language) language.value = PLAN_LANGUAGE[isZh() ? "zh" : "en"];
    }
    if (kind === "PSAPresetEditor") {
      loadLibrary().then(() => refreshEditor(node));
      chain(node, "onConnectionsChange", () => { node.psaRan = false; refreshEditor(node); });
    }
  },
});
