"""How much has a backbone learned? Three measures on the synthetic validation split.

For each backbone (names or checkpoint paths) and its seeded random-init twin:
1. same- vs different-class patch-key similarity (last block keys, objects only): ROC AUC and overlap;
2. MaskCut (3 masks, tau given) class-agnostic mask AP / AP50 against the ground truth;
3. best-buddies precision: fraction of salient best-buddy pairs between two scenes sharing a class
   that land on the same class.

A last row gives MaskCut's ceiling at that size: the AP when the "keys" are the ground-truth class of
each patch (one-hot, plus 0.1 seeded noise so the cut is well posed). At 64 px (an 8 x 8 grid for /8
models, objects 2-4 patches wide) it is only about 24 AP50, so a +10 AP50 gain there asks for nearly
perfect features; at 128 px (16 x 16) it is about 68. Hence the defaults: 128 px, and 200 images, because
48 are too few: the random-init twin alone scored 32 and 52 AP50 (and the class AUC of one tiny DINO
moved by 0.08) between two 48-image validation sets.

Another row gives the class AUC of a hand-made colour- and phase-invariant texture descriptor
(``dino.texture_reference``: FFT magnitudes of each 8 x 8 cell's standardised grey levels, the descriptor
of ``patch_probes.py``): about 0.67 at 128 px, so a patch feature can reach the issue's +0.15 AUC.

    python benchmarks/backbone_quality.py tiny_dino_synth [path.safetensors ...]   # 128 px, 200 images
"""

from __future__ import annotations

import argparse


def main():
    from nbsupport.models import backbones
    from nbsupport.training.dino.quality import backbone_quality, maskcut_ceiling, texture_reference

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backbones", nargs="+")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="which validation scenes (another seed, other scenes)")
    ap.add_argument("--tau", default="median", help="MaskCut tau: a number or 'median'")
    args = ap.parse_args()
    tau = args.tau if args.tau == "median" else float(args.tau)
    print(f"{'backbone':<44} {'patch AUC':>9} {'overlap':>8} {'mask AP':>8} {'AP50':>6} {'BB prec':>8}")
    for name in args.backbones:
        model = backbones.load(name)
        for m in (model, backbones.random_like(model)):
            r = backbone_quality(m, args.size, args.images, tau, args.seed)
            print(
                f"{backbones.describe(m)[:44]:<44} {r['patch AUC']:>9.3f} {r['overlap']:>8.3f} {r['mask AP']:>8.1f} "
                f"{r['mask AP50']:>6.1f} {r['BB precision']:>8.3f}"
            )
    r = texture_reference(args.size, args.images, args.seed)
    print(f"{'reference: hand-made texture descriptor (FFT)':<44} {r['patch AUC']:>9.3f} {r['overlap']:>8.3f}")
    r = maskcut_ceiling(args.size, args.images, tau, args.seed)
    print(
        f"{'ceiling: ground-truth class one-hot keys':<44} {'':>9} {'':>8} {r['mask AP']:>8.1f} {r['mask AP50']:>6.1f}"
    )


if __name__ == "__main__":
    main()
