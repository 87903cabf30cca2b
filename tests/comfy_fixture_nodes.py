"""Test-only ComfyUI node, copied into the test server's custom_nodes: text conditioning
without a text encoder. Wan's umT5-XXL encoder is far too large for CPU tests, and the tiny
test model only needs [1, tokens, 4096] text embeddings, the shape that encoder produces."""
import torch


class PSATestTextEmbeds:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "tokens": ("INT", {"default": 16, "min": 1, "max": 1024})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "embed"
    CATEGORY = "testing"

    def embed(self, seed, tokens):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, 4096, generator=g), {}]],)


NODE_CLASS_MAPPINGS = {"PSATestTextEmbeds": PSATestTextEmbeds}


class PSATestAttentionBackend:
    """What "Model Attention Backend" of newer ComfyUI does, for the 0.3.64 snapshot that lacks
    it: a clone whose optimized_attention_override is a closure over one attention function."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model):
        import logging

        import comfy.ldm.modules.attention as attention

        backend = attention.attention_pytorch
        logged = []

        def optimized_attention_override(_, *args, **kwargs):
            if not logged:
                logged.append(True)
                logging.info("[PSATestAttentionBackend] ran attention_pytorch")
            return backend(*args, **kwargs)

        m = model.clone()
        m.model_options["transformer_options"]["optimized_attention_override"] = optimized_attention_override
        return (m,)


NODE_CLASS_MAPPINGS["PSATestAttentionBackend"] = PSATestAttentionBackend
