"""Messages that reach the ComfyUI frontend (errors, warnings, node texts) in English and Chinese.

The server does not know the language of the browser that queued a prompt, so an error raised
by a PSA node carries both: the English line first, then its Chinese translation. Messages keep
one style, ``field: got X; allowed: Y``; the field becomes the widget name a Chinese user sees
(from locales/zh/nodeDefs.json) and the fixed phrases are translated by the table below. Values
(preset names, numbers, YAML paths) stay as they are.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

LOCALES = Path(__file__).resolve().parent.parent / "locales"

# English phrase -> Chinese, applied longest first. Covers the phrases of the pack's messages
# (config validation, the preset store, the editor, the nodes).
_PHRASES = {
    "got": "收到",
    "; allowed: ": "；允许：",
    "allowed: ": "允许：",
    "; ": "；",
    "unknown field": "未知字段",
    "unknown section": "未知模型节",
    "unknown preset": "未知预设",
    "unknown level": "未知层级",
    "is not a preset of section": "不是该模型节的预设：模型节",
    "some presets could not be loaded": "部分预设未能加载",
    "(none loaded)": "（未加载任何模型节）",
    "an integer >= ": "不小于此值的整数 ",
    "an integer": "整数",
    "a number in": "区间内的数",
    "a mapping": "映射（键: 值）",
    "true or false": "true 或 false",
    "malformed YAML": "YAML 格式错误",
    "cannot read": "无法读取",
    "no such file": "文件不存在",
    "line": "行",
    "column": "列",
    "a range 'lo, hi' with 0 <= lo <= hi <= 1": "区间 'lo, hi'（0 <= lo <= hi <= 1）",
    "a range that must start at 0, as the first level with a range": "必须从 0 开始的区间（它是第一个有区间的层级）",
    "a range that must end at 1, as the last level with a range": "必须到 1 结束的区间（它是最后一个有区间的层级）",
    "a range that joins": "与之首尾相接的区间：",
    "change one of the two, or set the other back to keep": "请修改两者之一，或把另一个改回 keep",
    "ranges in level order 1, 2, 4, 8, 0 that do not overlap": "按层级顺序 1、2、4、8、0 排列且互不重叠的区间",
    "ends at": "结束于",
    "starts at": "开始于",
    "after": "晚于",
    "at least one level with a range (give level 0 '0, 1' to skip everything)":
        "至少一个层级有区间（给层级 0 填 '0, 1' 表示全部跳过）",
    "for every level": "（所有层级）",
    "one of the allowed sizes": "允许的尺寸之一",
    "three integers 'depth, height, width'": "三个整数 '深度, 高度, 宽度'",
    "three numbers 'x2, x4, x8' in [-1, 1]": "三个 [-1, 1] 内的数 'x2, x4, x8'",
    "or": "或",
    "'auto' needs the model input connected; or pick a section:": "'auto' 需要连接模型输入；或选择一个模型节：",
    "auto does not know this model": "auto 无法识别此模型",
    "auto does not know a Wan model of hidden size": "auto 无法识别此隐藏维度的 Wan 模型：",
    "pick a section by hand:": "请手动选择模型节：",
    "but no such section is loaded; pick one of:": "但该模型节未加载；请选择：",
    "auto detected": "auto 识别为",
    "connect a PSA Loader or PSA Preset Editor": "请连接 PSA 加载器或 PSA 预设编辑器",
    "'incoming' has no section (no preset connected); pick one": "'incoming' 没有模型节（未连接预设）；请选择一个",
    "already exists in section": "已存在于模型节",
    "turn on overwrite to replace it, or choose another name. Nothing was written.":
        "打开「覆盖」以替换，或换一个名称。未写入任何内容。",
    "letters (any script), digits and _ . + - (starting with a letter or digit), not 'default'":
        "任何文字的字母、数字和 _ . + -（以字母或数字开头），不能是 'default'",
    "cannot save": "无法保存",
    "nothing was written": "未写入任何内容",
    "is reversed": "首尾颠倒",
    "is out of order: it must start at": "顺序错误：必须开始于",
    "where the previous level ends": "即上一层级的结束处",
    "the last range ends at": "最后一个区间结束于",
    "the ranges must reach 1.0": "各区间必须到达 1.0",
    "give level 0 the rest to skip it": "把剩余部分给层级 0 以跳过",
    "no presets; add at least one preset": "没有预设；请至少添加一个预设",
    "the top level must map model section names to sections": "顶层必须是模型节名称到模型节的映射",
    "no plan recorded": "没有记录到注意力计划",
    "model:": "模型：",
    "not a model patched by Apply PSA": "不是经「应用 PSA」修补的模型",
    "connect Apply PSA's MODEL output": "请连接「应用 PSA」的 MODEL 输出",
    "turn on record_plan on that Apply PSA node and run the sampler again":
        "请在该「应用 PSA」节点上打开 record_plan，然后重新运行采样器",
    "every self-attention call ran dense so far": "目前所有自注意力调用都使用了全注意力",
    "connect the sampler's output to samples so that this node runs after sampling":
        "请把采样器的输出连接到 samples，使本节点在采样之后运行",
    "blocks:": "块：",
    "a list of block numbers like '0, 15, 29', or 'auto'": "块编号列表，如 '0, 15, 29'，或 'auto'",
    "recorded blocks": "已记录的块",
    "matplotlib is not installed; install it into ComfyUI's Python": "未安装 matplotlib；请安装到 ComfyUI 的 Python 环境",
}
_NODE_NAMES = {"PSA Preset Editor": "PSA 预设编辑器", "PSA Loader": "PSA 加载器", "Apply PSA": "应用 PSA",
               "PSA Plan View": "PSA 计划视图"}
_REGEX = [(re.compile(r"allowed with n=(\d+): "), r"n=\1 时允许："),
          (re.compile(r"\(line (\d+), column (\d+)\)"), r"（第 \1 行，第 \2 列）")]
_QUOTED_RE = re.compile(r"'[^']*'")


@lru_cache(maxsize=1)
def zh_widget_names() -> dict[str, str]:
    """Input id -> its Chinese label, over every node of the pack."""
    try:
        defs = json.loads((LOCALES / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    names = {}
    for node in defs.values():
        for key, spec in node.get("inputs", {}).items():
            if spec.get("name") and spec["name"] != key:
                names[key] = spec["name"]
    return names


@lru_cache(maxsize=1)
def _phrase_re() -> re.Pattern:
    words = sorted(_PHRASES, key=len, reverse=True)
    # whole phrases only: a phrase that starts or ends with a letter needs a word boundary there
    parts = [(r"\b" if w[0].isalnum() else "") + re.escape(w) + (r"\b" if w[-1].isalnum() else "") for w in words]
    return re.compile("|".join(parts))


def zh(text: str) -> str:
    """The Chinese version of a message in the pack's style (unknown words stay English)."""
    for en, cn in _NODE_NAMES.items():
        text = text.replace(en + ": ", cn + "：")
    for pattern, repl in _REGEX:
        text = pattern.sub(repl, text)
    phrases = _phrase_re()
    quoted = [w for w in _PHRASES if "'" in w]
    for w in sorted(quoted, key=len, reverse=True):
        text = text.replace(w, _PHRASES[w])
    # values in quotes stay as they are: set aside while the words around them are translated
    kept = _QUOTED_RE.findall(text)
    text = _QUOTED_RE.sub("\x00", text)
    names = zh_widget_names()
    label = (lambda w: f"{names[w]}（{w}）" if w in names else w)
    # the leading field is a widget; further on only names with an underscore are (level_1, save_name)
    text = re.sub(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ", lambda m: label(m.group(1)) + "：", text)
    text = re.sub(r"(?<=：)([a-z][a-z0-9_]*): ", lambda m: label(m.group(1)) + "：", text)
    text = phrases.sub(lambda m: _PHRASES[m.group(0)], text)
    text = re.sub(r"(?<!（)\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b(?!）)", lambda m: label(m.group(0)), text)
    text = text.replace(": ", "：")
    for value in kept:
        text = text.replace("\x00", value, 1)
    return text


def bilingual(text: str) -> str:
    """English line, then the Chinese one (the server cannot know the user's language)."""
    cn = zh(text)
    return text if cn == text else f"{text}\n{cn}"
