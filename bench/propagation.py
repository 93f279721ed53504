"""3D Dice of ``sam_3d``'s propagation from one slice's box, for several walk settings.

For every organ of every volume of a MONAI Label datastore (images + ``labels/final``), the tight ROI box
of the organ's largest slice prompts that slice, and :func:`sam_medical.inference.propagation.propagate` walks up
and down. One JSON line per setting, best first::

    python bench/propagation.py --studies sample_volumes --model medsam_lite

Settings: the box margin (fraction of the previous mask's extent, plus one voxel), the predicted-IoU
stop, and whether the previous mask's interior point is added as a click. Embeddings are cached, so
every setting after the first costs only mask decoding.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from sam_medical.inference.caches import VolumeCache
from sam_medical.inference.predictor import VolumePredictor
from sam_medical.inference.propagation import PropagationOptions, propagate
from sam_medical.metrics import dice
from sam_medical.model.build import build_sam
from sam_medical.volume.io import image_stem, load_volume


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", default="sample_volumes", help="datastore folder (images + labels/final)")
    ap.add_argument("--model", default="medsam_lite")
    ap.add_argument("--adapter", default=None, help="LoRA adapter to load first")
    args = ap.parse_args(argv)

    sam, info = build_sam(args.model)
    if args.adapter:
        from sam_medical.adapters.inject import merge_lora
        from sam_medical.adapters.save_and_load import load_adapter

        load_adapter(sam, args.adapter, base_info=info)
        merge_lora(sam)
    predictor, volumes = VolumePredictor(sam, "bench"), VolumeCache()
    studies = Path(args.studies)
    objects = []
    for image in sorted(studies.glob("*.nii*")):
        label = load_volume(studies / "labels" / "final" / image.name).array
        key, vol, _ = volumes.load(image)
        for value in sorted(int(v) for v in np.unique(label) if v):
            obj = label == value
            k = int(np.argmax(obj.sum(axis=(0, 1))))
            ii, jj = np.nonzero(obj[:, :, k])
            objects.append(
                (image_stem(image), value, key, vol, obj, k, (ii.min(), ii.max(), jj.min(), jj.max()))
            )

    results = []
    for margin, min_iou, click in itertools.product((0.0, 0.05, 0.1), (0.0, 0.75, 0.85), (False, True)):
        opts = PropagationOptions(box_margin=margin, min_iou=min_iou, use_point=click)
        scores = []
        for _, _, key, vol, obj, k, box in objects:
            out, _ = propagate(predictor, key, vol, k, None, None, box, options=opts)
            scores.append(dice(out > 0, obj))
        results.append(
            {
                "bench": "propagation",
                "model": args.model,
                "adapter": args.adapter,
                "box_margin": margin,
                "min_iou": min_iou,
                "click": click,
                "default": opts == PropagationOptions(),
                "objects": len(scores),
                "dice_3d_mean": round(float(np.mean(scores)), 4),
                "dice_3d_min": round(float(np.min(scores)), 4),
                "per_object": {
                    f"{c}:{v}": round(s, 3) for (c, v, *_), s in zip(objects, scores, strict=True)
                },
            }
        )
    for r in sorted(results, key=lambda r: -r["dice_3d_mean"]):
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
