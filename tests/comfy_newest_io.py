"""A test double of the newest ComfyUI's V3 node API (``comfy_api.latest``: io, ui, ComfyExtension),
as far as the pack's nodes use it, and of the way its executor turns a prompt's inputs into the
arguments of ``execute``; for the API version the real-ComfyUI tests cannot run (they run the
0.3.64 snapshot, which has no DynamicCombo).

Written from that version's comfy_api/latest/_io.py (``Input``, ``WidgetInput``, ``Combo``,
``DynamicCombo``, ``Schema.validate``, ``create_input_dict_v1``, ``get_finalized_class_inputs``,
``parse_class_inputs``, ``build_nested_inputs``) and execution.py (``validate_inputs``,
``get_input_data``), in our words; what it keeps of that contract:

- every input takes ``extra_dict`` (merged into its definition) and ``advanced``; a
  ``DynamicCombo.Input`` takes ``options`` (``DynamicCombo.Option(key, inputs)``), no default;
- the node definition holds a DynamicCombo as ``("COMFY_DYNAMICCOMBO_V3", {"options": [{"key",
  "inputs": {"required": {...}, "optional": {...}}}]})``; ``Schema.validate`` checks ids for
  uniqueness among the inputs that are not dynamic only;
- a prompt holds a DynamicCombo's value under its id and the chosen option's inputs under
  ``id.input``; the executor expands the definition for the prompt's value: a value that is an
  option adds the combo and that option's inputs, a value that is no option (or none) adds
  nothing, so the input is neither validated nor passed;
- validation: every required input of the expanded definition must be in the prompt; a COMBO
  value must be one of its options;
- only inputs of the expanded definition reach ``execute`` (unless the schema accepts all
  inputs); the combo's value and its option's inputs arrive nested, as
  ``id={"id": value, "input": ...}``, an optional option input missing from the prompt as None.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"


def _pruned(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class Input:
    io_type: str = None

    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 extra_dict=None, raw_link: bool = None, advanced: bool = None):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.lazy, self.raw_link, self.advanced = lazy, raw_link, advanced
        self.extra_dict = extra_dict if extra_dict is not None else {}

    def as_dict(self) -> dict:
        return _pruned({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                        "lazy": self.lazy, "rawLink": self.raw_link, "advanced": self.advanced}) \
            | _pruned(self.extra_dict)

    def get_all(self) -> list[Input]:
        return [self]

    def validate(self):
        pass


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 default: Any = None, socketless: bool = None, widget_type: str = None, force_input: bool = None,
                 extra_dict=None, raw_link: bool = None, advanced: bool = None, **widget):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link, advanced)
        self.default, self.socketless, self.force_input = default, socketless, force_input
        self.widget = widget  # min, max, step, multiline, ...: type-specific keys of the definition

    def as_dict(self) -> dict:
        return super().as_dict() | _pruned({"default": self.default, "socketless": self.socketless,
                                            "forceInput": self.force_input, **self.widget})


class Output:
    io_type: str = None

    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name or id, tooltip, is_output_list


def _comfy_type(io_type: str, widget: bool = False):
    base = WidgetInput if widget else Input
    return type(io_type.title(), (), {
        "io_type": io_type,
        "Input": type("Input", (base,), {"io_type": io_type}),
        "Output": type("Output", (Output,), {"io_type": io_type}),
    })


def Custom(io_type: str):
    return _comfy_type(io_type)


class Combo:
    io_type = "COMBO"

    class Input(WidgetInput):
        io_type = "COMBO"

        def __init__(self, id: str, options: list[str] = None, display_name: str = None, optional=False,
                     tooltip: str = None, lazy: bool = None, default: str = None, control_after_generate=None,
                     socketless: bool = None, extra_dict=None, raw_link: bool = None, advanced: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, None, extra_dict,
                             raw_link, advanced, options=options, control_after_generate=control_after_generate)
            self.options = options

    Output = type("Output", (Output,), {"io_type": "COMBO"})


class DynamicInput(Input):
    pass


class DynamicCombo:
    io_type = DYNAMIC_COMBO

    class Option:
        def __init__(self, key: str, inputs: list[Input]):
            self.key, self.inputs = key, inputs

        def as_dict(self) -> dict:
            return {"key": self.key, "inputs": input_dict(self.inputs)}

    class Input(DynamicInput):
        io_type = DYNAMIC_COMBO

        def __init__(self, id: str, options: list, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
            self.options = options

        def get_all(self) -> list[Input]:
            return [self] + [i for option in self.options for i in option.inputs]

        def as_dict(self) -> dict:
            return super().as_dict() | {"options": [o.as_dict() for o in self.options]}

        def validate(self):
            for option in self.options:
                for i in option.inputs:
                    i.validate()


Int, Float, String, Boolean = (_comfy_type(t, widget=True) for t in ("INT", "FLOAT", "STRING", "BOOLEAN"))
Model, Latent, Image = (_comfy_type(t) for t in ("MODEL", "LATENT", "IMAGE"))


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False
    accept_all_inputs: bool = False

    def validate(self):
        ids = [i.id for top in self.inputs if not isinstance(top, DynamicInput) for i in top.get_all()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"Input ids must be unique, but {ids} are not.")
        for i in self.inputs:
            i.validate()


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    def __getitem__(self, index):
        return self.args[index]


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError


class ComfyExtension:
    async def get_node_list(self):
        return []


class _Preview:
    def __init__(self, value, **kwargs):
        self.value = value

    def as_dict(self) -> dict:
        return {"text": (self.value,)} if isinstance(self.value, str) else {"images": []}


io = types.SimpleNamespace(
    Input=Input, WidgetInput=WidgetInput, Output=Output, Custom=Custom, Combo=Combo, DynamicInput=DynamicInput,
    DynamicCombo=DynamicCombo, Int=Int, Float=Float, String=String, Boolean=Boolean, Model=Model, Latent=Latent,
    Image=Image, Schema=Schema, NodeOutput=NodeOutput, ComfyNode=ComfyNode)
ui = types.SimpleNamespace(PreviewText=_Preview, PreviewImage=_Preview)


def latest_module(with_dynamic_combo: bool = True) -> types.ModuleType:
    """A ``comfy_api.latest`` module of this double; without DynamicCombo it stands for a version
    that lacks it (the other differences from 0.3.64 stay)."""
    module = types.ModuleType("comfy_api.latest")
    module.io = types.SimpleNamespace(**vars(io))
    if not with_dynamic_combo:
        del module.io.DynamicCombo
    module.ui, module.ComfyExtension = ui, ComfyExtension
    return module


# --- the node definition ComfyUI sends the frontend (/object_info) -----------------------------

def input_dict(inputs: list[Input]) -> dict:
    out = {"required": {}}
    for i in inputs:
        spec = i.as_dict()
        spec.pop("optional", None)
        out.setdefault("optional" if i.optional else "required", {})[i.id] = (i.io_type, spec)
    return out


# --- the executor: a prompt's inputs -> execute's arguments ------------------------------------

class PromptError(Exception):
    """What ComfyUI's validation answers for the node: a list of {"type", "message", "details"}."""

    def __init__(self, errors: list[dict]):
        self.errors = errors
        super().__init__("; ".join(f"{e['message']}: {e['details']}" for e in errors))


def expand(definition: dict, prompt_inputs: dict) -> tuple[dict, dict]:
    """The definition as it stands for this prompt ({"required", "optional"}, dotted ids) and the
    nesting paths of the dynamic inputs' values."""
    out = {"required": {}, "optional": {}}
    paths: dict[str, str] = {}

    def walk(sections: dict, prefix: list[str]):
        for category, entries in sections.items():
            for name, spec in entries.items():
                full = ".".join(prefix + [name])
                if spec[0] == DYNAMIC_COMBO:
                    chosen = next((o for o in spec[1]["options"] if full in prompt_inputs
                                   and o["key"] == prompt_inputs[full]), None)
                    if chosen is not None:
                        walk(chosen["inputs"], prefix + [name])
                        out[category][full] = spec
                        paths[full] = f"{full}.{name}"
                else:
                    out[category][full] = spec
                    if prefix:
                        paths[full] = full

    walk(definition, [])
    return out, paths


def validate(definition: dict, prompt_inputs: dict, linked: dict) -> None:
    errors = []
    for category in ("required", "optional"):
        for name, (io_type, spec) in definition[category].items():
            if name in linked:
                continue
            if name not in prompt_inputs:
                if category == "required":
                    errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                   "details": name.split(".")[-1]})
                continue
            value = prompt_inputs[name]
            if io_type == "COMBO" and value not in spec.get("options", []):
                errors.append({"type": "value_not_in_list", "message": "Value not in list",
                               "details": f"{name}: {value!r} not in {spec['options']}"})
    if errors:
        raise PromptError(errors)


def nest(values: dict, paths: dict) -> dict:
    values = dict(values)
    result: dict = {}
    for key, path in paths.items():
        *parents, last = path.split(".")
        current = result
        for part in parents:
            current = current.setdefault(part, {})
        current[last] = values.pop(key, None)
    values.update(result)
    return values


def run(node_cls, prompt_inputs: dict, linked: dict | None = None):
    """Validate a prompt's inputs for ``node_cls`` and call its execute, as the executor does.
    ``prompt_inputs`` are the widget values; ``linked`` the values that come from links."""
    schema = node_cls.define_schema()
    schema.validate()
    given = {**prompt_inputs, **(linked or {})}
    definition, paths = expand(input_dict(schema.inputs), given)
    validate(definition, prompt_inputs, linked or {})
    known = set(definition["required"]) | set(definition["optional"])
    args = {k: v for k, v in given.items() if k in known or schema.accept_all_inputs}
    return node_cls.execute(**nest(args, paths))
