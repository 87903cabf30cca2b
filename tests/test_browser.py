"""The pack in a real browser: ComfyUI's own frontend in headless Chromium, driven by Playwright.

Needs COMFYUI_PATH (a ComfyUI checkout with its requirements), the Python package `playwright`
(installed with PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1: it drives Debian's Chromium, never a browser
of its own) and /usr/bin/chromium (Debian package `chromium`; `fonts-noto-cjk` for readable
Chinese in the screenshots). Without any of them every test here is skipped with a warning;
with PSA_REQUIRE_BROWSER=1 (CI sets it once it has installed them) they fail instead.
Screenshots go to out/browser/ (or $PSA_ARTIFACTS).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from comfy_harness import ComfyServer, comfyui_path_or_skip, make_tiny_wan, new_base
from pack_import import pack_module

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("PSA_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("PSA_ARTIFACTS", REPO / "out" / "browser"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
TINY = "tiny_wan_browser.safetensors"
PSA_TYPES = ("PSALoader", "PSAPresetEditor", "ApplyPSA", "PSAPlanView")


def _skip(reason: str):
    if os.environ.get("PSA_REQUIRE_BROWSER") == "1":
        pytest.fail(reason.replace("did NOT run", "cannot run") + " (PSA_REQUIRE_BROWSER=1)")
    warnings.warn(reason, UserWarning, stacklevel=2)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error as PlaywrightError, sync_playwright
    except ImportError:
        _skip("playwright is not installed: the browser tests did NOT run "
              "(PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 pip install playwright)")
    if not CHROMIUM.is_file():
        _skip(f"{CHROMIUM} not found: the browser tests did NOT run (apt-get install chromium)")
    with sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True, timeout=120_000)
        except PlaywrightError as e:  # a browser that does not start on this machine
            _skip(f"{CHROMIUM} did not start: the browser tests did NOT run ({str(e).splitlines()[0]})")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = comfyui_path_or_skip()
    base = new_base(tmp_path_factory.mktemp("browser"), comfy)
    make_tiny_wan(comfy, base / "models" / "diffusion_models" / TINY, seed=3)
    broken = base / "broken_presets.yaml"
    broken.write_text("Wan2.1_1.3b:\n  attention_configs:\n    mine: {mask_mode: sideways}\n", encoding="utf-8")
    env = {"PSA_USER_PRESETS": str(broken)}
    try:
        srv = ComfyServer(comfy, base, env=env)
    except RuntimeError as first:  # one more try (a port taken between choosing and binding it, a slow start)
        warnings.warn(f"ComfyUI did not start, trying once more: {str(first).splitlines()[0]}", UserWarning)
        srv = ComfyServer(comfy, base, env=env)
    yield srv
    srv.stop()


def _page(browser, server, lang: str):
    settings = server.base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.Locale": lang, "Comfy.TutorialCompleted": True,
                                    "Comfy.Validation.Workflows": True}), encoding="utf-8")
    page = browser.new_page(viewport={"width": 1600, "height": 1000}, locale=lang)
    errors = []
    # errors of the page that come from the pack's code (its extension lives under .../PSA.../psa.js);
    # the frontend's own start-up errors are not the pack's to judge
    page.on("pageerror", lambda e: errors.append(f"{e}\n{e.stack}") if "psa" in (e.stack or "").lower() else None)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "psa" in m.text.lower() else None)
    page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph"
                           " && window.LiteGraph.registered_node_types['PSALoader']", timeout=120_000)
    page.wait_for_timeout(1500)
    return page, errors


def _shot(page, name: str, types=None) -> None:
    """Screenshot with the whole graph in view, then (given ``types``) at a readable zoom with the
    top left of those nodes in view."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(600)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    if types:
        page.evaluate("""types => { const c = window.app.canvas, ds = c.ds;
            const nodes = window.app.graph._nodes.filter(n => types.includes(n.type));
            const x = Math.min(...nodes.map(n => n.pos[0])), y = Math.min(...nodes.map(n => n.pos[1]));
            ds.scale = 0.85; ds.offset = [40 / ds.scale - x, 90 / ds.scale - y]; c.setDirty(true, true); }""",
                      list(types))
        page.wait_for_timeout(600)
        page.screenshot(path=str(ARTIFACTS / f"{name}_psa_nodes.png"))


NODES_JS = """() => window.app.graph._nodes.map(n => ({
    type: n.type, title: n.title, registered: !!window.LiteGraph.registered_node_types[n.type],
    widgets: (n.widgets || []).map(w => ({name: w.name, label: w.label || null, value: w.value,
                                          options: Array.isArray(w.options?.values) ? w.options.values : null,
                                          shown: w._displayValue ?? null}))}))"""


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_workflows_render_psa_nodes_and_the_ui_helps(browser, server, lang):
    page, errors = _page(browser, server, lang)
    toast = page.locator(".p-toast-message")
    toast.first.wait_for(timeout=60_000)
    text = toast.first.inner_text()
    assert ("部分预设未能加载" if lang == "zh" else "some presets could not be loaded") in text, text
    assert "mask_mode" in text
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        page.evaluate("wf => window.app.loadGraphData(wf)", wf)
        page.wait_for_timeout(1000)
        nodes = page.evaluate(NODES_JS)
        assert all(n["registered"] for n in nodes), [n["type"] for n in nodes if not n["registered"]]
        psa = [n for n in nodes if n["type"] in PSA_TYPES]
        assert {"PSALoader", "ApplyPSA"} <= {n["type"] for n in psa}
        loader = next(n for n in psa if n["type"] == "PSALoader")
        widgets = {w["name"]: w for w in loader["widgets"]}
        if lang == "zh":
            assert loader["title"] == "PSA 加载器" and widgets["model_section"]["label"] == "模型节"
            labels = {"default": "默认 (default)", "auto": "自动识别 (auto)"}
            for name in ("model_section", "preset"):
                if widgets[name]["value"] in labels:
                    assert widgets[name]["shown"] == labels[widgets[name]["value"]]
        else:
            assert loader["title"] == "PSA Loader"
        section = widgets["model_section"]["value"]
        if section != "auto":  # the list holds the chosen section's presets only
            assert "psa_topk" not in widgets["preset"]["options"] or section == "Wan2.1_1.3b"
        else:
            assert len(widgets["preset"]["options"]) > 3
        editors = [n for n in psa if n["type"] == "PSAPresetEditor"]
        for ed in editors:
            kind = next(w for w in ed["widgets"] if w["name"] == "type")
            assert kind["shown"] == ("保持 (keep)" if lang == "zh" else "keep")
            preview = next(w for w in ed["widgets"] if w["name"] == "psa_preview")
            assert "mask_ratios" in preview["value"] or "auto" in preview["value"], preview["value"]
        for view in (n for n in psa if n["type"] == "PSAPlanView"):
            # saved without a language (an older workflow): the node takes the interface's
            language = next(w for w in view["widgets"] if w["name"] == "language")
            assert language["value"] == ("中文" if lang == "zh" else "English")
        _shot(page, f"{path.stem}_{lang}", PSA_TYPES)
    # switching a Loader's section filters its preset list at once
    page.evaluate("""() => { const n = window.app.graph._nodes.find(n => n.type === 'PSALoader');
        const w = n.widgets.find(w => w.name === 'model_section'); w.value = 'Wan2.1_14b'; w.callback(w.value); }""")
    opts = page.evaluate("""() => window.app.graph._nodes.find(n => n.type === 'PSALoader')
        .widgets.find(w => w.name === 'preset').options.values""")
    assert "psa_topk" not in opts and "default" in opts
    assert not errors, errors
    page.close()


WIDGET_AT_JS = """([type, name]) => { const c = window.app.canvas, ds = c.ds, LG = window.LiteGraph;
    const node = window.app.graph._nodes.find(n => n.type === type);
    const w = node.widgets.find(w => w.name === name);
    ds.scale = 1; ds.offset = [300 - node.pos[0], 300 - node.pos[1]];
    c.setDirty(true, true); c.draw(true, true);  // drawn now: the widgets know their y
    ds.offset = [300 - node.pos[0], 400 - node.pos[1] - w.y];  // the widget in the middle of the view
    c.setDirty(true, true); c.draw(true, true);
    const [x, y] = ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2,
                                             node.pos[1] + w.y + (w.computedHeight || LG.NODE_WIDGET_HEIGHT) / 2]);
    const rect = c.canvas.getBoundingClientRect();
    return [rect.left + x, rect.top + y]; }"""

WIDGET_STATE_JS = """async ([type, name]) => { const app = window.app;
    const node = app.graph._nodes.find(n => n.type === type);
    const w = node.widgets.find(w => w.name === name);
    const saved = app.graph.serialize().nodes.find(n => n.id === node.id).widgets_values;
    const prompt = (await app.graphToPrompt()).output[String(node.id)].inputs[name];
    return {value: w.value, shown: w._displayValue, saved: saved[node.widgets.indexOf(w)], prompt}; }"""


def _open_dropdown(page, node_type: str, name: str):
    """Clicks the middle of a combo widget, as a user does; the dropdown list it opens."""
    x, y = page.evaluate(WIDGET_AT_JS, [node_type, name])
    page.mouse.click(x, y)
    menu = page.locator(".litecontextmenu").last
    menu.wait_for(timeout=15_000)
    return menu


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_dropdowns_show_chinese_labels_and_keep_the_english_values(browser, server, lang):
    zh = lang == "zh"
    page, errors = _page(browser, server, lang)
    page.evaluate("wf => window.app.loadGraphData(wf)", json.loads((REPO / "workflows" / "wan2.1_t2v_1.3B_psa.json").read_text()))
    page.wait_for_timeout(1000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    menu = _open_dropdown(page, "PSAPresetEditor", "type")
    entries = menu.locator(".litemenu-entry")
    assert entries.all_inner_texts() == (["保持 (keep)", "稀疏注意力 (psa)", "全注意力 (dense)"] if zh
                                         else ["keep", "psa", "dense"])
    page.screenshot(path=str(ARTIFACTS / f"dropdown_editor_type_{lang}.png"))
    entries.nth(2).click()
    state = page.evaluate(WIDGET_STATE_JS, ["PSAPresetEditor", "type"])
    assert state == {"value": "dense", "shown": "全注意力 (dense)" if zh else "dense", "saved": "dense", "prompt": "dense"}
    # a level-range text field left on keep reads the same way, and sends 'keep'
    state = page.evaluate(WIDGET_STATE_JS, ["PSAPresetEditor", "level_1"])
    assert state == {"value": "keep", "shown": "保持 (keep)" if zh else "keep", "saved": "keep", "prompt": "keep"}

    # a longer list: ComfyUI adds a filter box, which finds the Chinese labels too
    menu = _open_dropdown(page, "PSALoader", "model_section")
    texts = menu.locator(".litemenu-entry").all_inner_texts()
    assert texts[0] == ("自动识别 (auto)" if zh else "auto") and "Wan2.1_14b" in texts
    page.screenshot(path=str(ARTIFACTS / f"dropdown_loader_section_{lang}.png"))
    if zh:
        menu.locator(".comfy-context-menu-filter").fill("自动")
        shown = [t for t, visible in zip(menu.locator(".litemenu-entry").all_inner_texts(),
                                         menu.locator(".litemenu-entry").evaluate_all("es => es.map(e => e.style.display !== 'none')"))
                 if visible]
        assert shown == ["自动识别 (auto)"]
        menu.locator(".comfy-context-menu-filter").press("Enter")
    else:
        menu.locator(".litemenu-entry", has_text="auto").first.click()
    state = page.evaluate(WIDGET_STATE_JS, ["PSALoader", "model_section"])
    assert state["value"] == state["saved"] == state["prompt"] == "auto"

    menu = _open_dropdown(page, "PSAPresetEditor", "save_section")
    assert menu.locator(".litemenu-entry").first.inner_text() == ("沿用输入 (incoming)" if zh else "incoming")
    page.keyboard.press("Escape")
    assert not errors, errors
    page.close()


TINY_GRAPH_JS = """async (model) => {
  const app = window.app, LG = window.LiteGraph;
  app.graph.clear();
  const add = (type, pos, values) => { const n = LG.createNode(type); n.pos = pos; app.graph.add(n);
      for (const [k, v] of Object.entries(values || {})) { const w = n.widgets.find(w => w.name === k);
          w.value = v; w.callback?.(v); } return n; };
  const unet = add('UNETLoader', [0, 0], {unet_name: model});
  const loader = add('PSALoader', [0, 200], {model_section: 'Wan2.1_1.3b', preset: 'psa_topk'});
  const editor = add('PSAPresetEditor', [350, 200], {warmup_steps: 1});
  const apply = add('ApplyPSA', [350, 0], {record_plan: true});
  const pos = add('PSATestTextEmbeds', [0, 400], {seed: 1});
  const neg = add('PSATestTextEmbeds', [0, 550], {seed: 2});
  const latent = add('EmptyHunyuanLatentVideo', [350, 400], {width: 256, height: 256, length: 9});
  const ks = add('KSampler', [700, 0], {steps: 3, cfg: 5.0, sampler_name: 'euler', scheduler: 'simple'});
  const view = add('PSAPlanView', [1050, 0], {});
  unet.connect(0, apply, 0); loader.connect(0, editor, 0); editor.connect(0, apply, 1);
  apply.connect(0, ks, 0); pos.connect(0, ks, 1); neg.connect(0, ks, 2); latent.connect(0, ks, 3);
  apply.connect(0, view, 0); ks.connect(0, view, 1);
  view.size = [600, 560];
  window.__psaDone = null;
  const api = window.comfyAPI.api.api;
  api.addEventListener('executed', e => { if (String(e.detail.node) === String(view.id)) window.__psaDone = e.detail; });
  api.addEventListener('execution_error', e => { window.__psaDone = {error: e.detail}; });
  await app.queuePrompt(0, 1);
  return view.widgets.find(w => w.name === 'language').value;
}"""
PICTURES = {}  # language -> the Plan View picture of the tiny prompt


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_tiny_prompt_shows_the_level_map(browser, server, lang):
    page, errors = _page(browser, server, lang)
    # a new Plan View node draws in the interface's language
    assert page.evaluate(TINY_GRAPH_JS, TINY) == ("中文" if lang == "zh" else "English")
    page.wait_for_function("() => window.__psaDone", timeout=300_000)
    done = page.evaluate("() => window.__psaDone")
    assert "error" not in done, done.get("error", {}).get("exception_message", done)
    assert done["output"]["text"][0].startswith("层级图所示的块：0, 1；每步的平均密度：1.000, 0." if lang == "zh" else
                                                "level maps of blocks: 0, 1; mean density per step: 1.000, 0.")
    images = done["output"]["images"]
    assert images and images[0]["type"] == "temp"
    picture = server.base / "temp" / images[0].get("subfolder", "") / images[0]["filename"]
    assert picture.is_file()
    page.wait_for_function("""() => { const n = window.app.graph._nodes.find(n => n.type === 'PSAPlanView');
        return n && n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 600; }""", timeout=30_000)
    page.wait_for_timeout(500)
    _shot(page, f"tiny_prompt_plan_view_{lang}", ("PSAPlanView",))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy2(picture, ARTIFACTS / f"plan_view_{lang}.png")
    PICTURES[lang] = picture
    if len(PICTURES) == 2 and pack_module("psa_kernels.plan_plot").cjk_font() is not None:
        # the same plan, drawn with English and with Chinese text (the server has this machine's fonts)
        from PIL import Image
        en, cn = (np.asarray(Image.open(PICTURES[k]).convert("RGB")) for k in ("en", "zh"))
        assert en.shape == cn.shape and (en != cn).any(axis=-1).mean() > 0.005
    assert not errors, errors
    page.close()
