"""Analytic forward FLOPs (a multiply-add counts 2) of the backbone and the heads, per image."""
from models.heads import HeadSpec
from models.vision_transformer import ViTSpec


def n_tokens(spec: ViTSpec, crop_size: int) -> int:
    """Tokens of one square crop: CLS + storage + patches."""
    return 1 + spec.n_storage_tokens + (crop_size // spec.patch_size) ** 2


def backbone_forward_flops(spec: ViTSpec, crop_size: int) -> int:
    """One square crop through the backbone: patch embed, then per block qkv, q.k and attn.v (every token pair),
    the output projection and the FFN. Norms, RoPE and softmax are left out (a few % at most)."""
    if crop_size % spec.patch_size:
        raise ValueError(f"crop size {crop_size} is not a multiple of the patch size {spec.patch_size}")
    dim = spec.embed_dim
    n_patches = (crop_size // spec.patch_size) ** 2
    tokens = n_tokens(spec, crop_size)
    patch_embed = 2 * n_patches * spec.in_chans * spec.patch_size**2 * dim
    ffn_matrices = 3 if spec.ffn == "swiglu" else 2
    per_block = (
        2 * tokens * dim * 3 * dim  # qkv
        + 2 * 2 * tokens * tokens * dim  # q.k and attn.v
        + 2 * tokens * dim * dim  # output projection
        + 2 * ffn_matrices * tokens * dim * spec.ffn_hidden_dim
    )
    return patch_embed + spec.depth * per_block


def head_forward_flops(in_dim: int, head: HeadSpec) -> int:
    """One token through a projection head."""
    dims = [in_dim] + [head.hidden_dim] * (head.n_layers - 1) + [head.bottleneck_dim, head.n_prototypes]
    return sum(2 * d_in * d_out for d_in, d_out in zip(dims[:-1], dims[1:], strict=True))
