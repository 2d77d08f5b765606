"""open_clip's `TimmModel` around a timm `VisionTransformer` with a MAP head (SigLIP, SigLIP2).

timm's names are the canonical ones (spec.py), so the adapter mostly drops the `trunk.` prefix and
renames the attention pool; what it checks is that every module LeGrad's math assumes plain
(patch norm, qk-norm, register tokens, pool position embedding, ...) really is an Identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from legrad_runtime.errors import UnsupportedModelError

from .spec import Activation, TowerSpec

__all__ = ["is_timm_map_vit", "describe", "canonical_state_dict", "activation_of", "check_map_trunk"]


def _trunk(visual: nn.Module | None) -> nn.Module | None:
    trunk = getattr(visual, "trunk", None)
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm comes with open_clip
        return None
    return trunk if isinstance(trunk, VisionTransformer) else None


def is_timm_map_vit(visual: nn.Module | None) -> bool:
    trunk = _trunk(visual)
    return trunk is not None and getattr(trunk, "global_pool", None) == "map"


def activation_of(act: nn.Module, model_name: str) -> Activation:
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if isinstance(act, nn.GELU) and act.approximate in ("none", "tanh"):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    for kind, activation in ((GELU, "gelu"), (GELUTanh, "gelu_tanh"), (QuickGELU, "quick_gelu")):
        if type(act) is kind:
            return activation
    raise UnsupportedModelError(
        f"{model_name} uses activation {act!r}; expected GELU (erf or tanh) or QuickGELU"
    )


def refuse_unless_plain(model_name: str, **modules: nn.Module | None) -> None:
    """Refuse any of these that is not absent or an Identity, naming it."""
    odd = [name for name, m in modules.items() if m is not None and not isinstance(m, nn.Identity)]
    if odd:
        raise UnsupportedModelError(
            f"{model_name}'s timm tower has {', '.join(odd)}, which LeGrad export does not model yet"
        )


def check_map_trunk(
    visual: nn.Module, model_name: str, kind: str, **plain: nn.Module | None
) -> tuple[Activation, int, int]:
    """What every MAP-head timm trunk must be (plain attention and MLPs, one-latent pool, square
    patches, one activation); `plain` names more modules that must be Identity. (activation, patch, grid)."""
    trunk = visual.trunk
    pool, blocks = trunk.attn_pool, list(trunk.blocks)
    refuse_unless_plain(
        model_name,
        patch_norm=trunk.patch_embed.norm,
        fc_norm=trunk.fc_norm,
        pool_q_norm=pool.q_norm,
        pool_k_norm=pool.k_norm,
        **plain,
        **{f"block {i} q_norm": b.attn.q_norm for i, b in enumerate(blocks)},
        **{f"block {i} k_norm": b.attn.k_norm for i, b in enumerate(blocks)},
        **{f"block {i} attention norm": getattr(b.attn, "norm", None) for i, b in enumerate(blocks)},
        **{f"block {i} MLP norm": getattr(b.mlp, "norm", None) for i, b in enumerate(blocks)},
    )
    one_latent = pool.pos_embed is None and pool.latent_len == 1 and pool.pool == "token"
    if len(getattr(visual, "head", [])) or not one_latent:
        raise UnsupportedModelError(
            f"{model_name} has a projection after the tower, or a pool with several latents or its "
            f"own positions; LeGrad export supports {kind}'s single-latent MAP head"
        )
    acts = {activation_of(b.mlp.act, model_name) for b in blocks} | {activation_of(pool.mlp.act, model_name)}
    if len(acts) != 1:
        raise UnsupportedModelError(f"{model_name} mixes activations {sorted(acts)}; not supported")
    (patch_h, patch_w), (grid_h, grid_w) = trunk.patch_embed.patch_size, trunk.patch_embed.grid_size
    if patch_h != patch_w or grid_h != grid_w:
        raise UnsupportedModelError(
            f"{model_name} has non-square patches or grid; only square ones supported"
        )
    return acts.pop(), patch_h, grid_h


def describe(visual: nn.Module, model_name: str) -> TowerSpec:
    """The spec of a MAP-head timm ViT; UnsupportedModelError for variants LeGrad export lacks."""
    from timm.models.vision_transformer import Block

    trunk = _trunk(visual)
    if trunk is None or trunk.global_pool != "map":
        raise UnsupportedModelError(f"{model_name}'s timm tower is not a MAP-head VisionTransformer")
    pool = trunk.attn_pool
    blocks = list(trunk.blocks)
    odd = {type(b).__name__ for b in blocks if type(b) is not Block}
    if odd or not all(
        isinstance(b.norm1, nn.LayerNorm) and isinstance(b.norm2, nn.LayerNorm) for b in blocks
    ):
        raise UnsupportedModelError(
            f"{model_name} uses {', '.join(sorted(odd)) or 'RMSNorm'} blocks; not supported yet"
        )
    if trunk.cls_token is not None or getattr(trunk, "reg_token", None) is not None:
        raise UnsupportedModelError(
            f"{model_name} has class or register tokens before a MAP head; not supported yet"
        )
    activation, patch, grid = check_map_trunk(
        visual, model_name, "SigLIP", norm_pre=trunk.norm_pre, classifier=trunk.head
    )
    return TowerSpec(
        family="timm_vit",
        width=trunk.embed_dim,
        heads=blocks[0].attn.num_heads,
        num_layers=len(blocks),
        patch_size=patch,
        native_grid=grid,
        embed_dim=trunk.embed_dim,
        activation=activation,
        head="map",
        prefix_tokens=0,
        eps=blocks[0].norm1.eps,
        head_heads=pool.num_heads,
    )


def canonical_state_dict(visual: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's tensors (views) under the canonical names of spec.py."""
    out = {}
    for name, tensor in visual.trunk.state_dict().items():
        if name == "pos_embed":
            out[name] = tensor[0]  # (1, N, D) → (N, D)
        elif name == "attn_pool.latent":
            out["pool.latent"] = tensor[0]  # (1, 1, D) → (1, D)
        elif name.startswith("attn_pool."):
            out["pool." + name[len("attn_pool.") :]] = tensor
        else:
            out[name] = tensor
    return out
