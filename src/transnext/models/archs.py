"""Architectures of the family (SPEC section 1), by timm model name."""

# name -> architecture (SPEC section 1). femto is ours: a small model for
# 28-32 px data (Fashion-MNIST), not a published variant.
ARCHS: dict[str, dict] = {
    "transnext_micro": dict(
        embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2),
        mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1)),
    "transnext_tiny": dict(
        embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(2, 2, 15, 2),
        mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1)),
    "transnext_small": dict(
        embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(5, 5, 22, 5),
        mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1)),
    "transnext_base": dict(
        embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), depths=(5, 5, 23, 5),
        mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1)),
    "transnext_micro_aaaa": dict(
        embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2),
        mlp_ratios=(8, 8, 4, 4), sr_ratios=(16, 8, 4, 2)),
    "transnext_femto": dict(
        embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(1, 1, 3, 1),
        mlp_ratios=(4, 4, 4, 4), sr_ratios=(4, 2, 2, 1)),
}
# Image size the released weights were trained at (SPEC section 5).
PRETRAIN_SIZE = {"transnext_micro_aaaa": 256, "transnext_femto": 28}
