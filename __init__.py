"""PSA for ComfyUI: Pyramid Sparse Attention for video diffusion models.

ComfyUI entry point only. It stays cheap to import: the nodes (and with them torch and the
kernels) load when ComfyUI asks for them.
"""


# The frontend extension (web/psa.js): per-section preset lists, the editor's incoming values,
# Chinese combo labels and warnings about the presets files.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.nodes import PSAExtension
    return PSAExtension()
