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
