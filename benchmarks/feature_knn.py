"""Diagnostic: how well do the frozen teacher's features alone separate MTD's defects?

Scores every test position by its distance to the nearest of a random sample
of training-image feature vectors (the teacher's stride-8 and stride-16
levels, 3x3 average-pooled, concatenated), takes the map's max as the image
score, and reports image / pixel AUROC. No student, no training: if this is
far above STPM, the teacher is not what limits STPM on the data.

    python benchmarks/feature_knn.py --name feature_knn_lite0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from anomap.backbones import create_backbone
from anomap.data import Geometry, LoadedSet, discover, load_set, split_holdout, to_float
from anomap.machine import describe_machine
from anomap.metrics import aupro, image_auroc, pixel_auroc

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "mtd"


def pooled_features(teacher: torch.nn.Module, loaded: LoadedSet, batch_size: int = 32
                    ) -> torch.Tensor:
    """(N, C8 + C16, S/8, S/8): both levels, locally averaged, at stride 8."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(loaded), batch_size):
            images = to_float(loaded.images[start:start + batch_size])
            fine, coarse = teacher(teacher.normalize(images))
            fine = F.avg_pool2d(fine, 3, 1, 1)
            coarse = F.interpolate(F.avg_pool2d(coarse, 3, 1, 1), size=fine.shape[-2:],
                                   mode="bilinear", align_corners=False)
            out.append(torch.cat((fine, coarse), dim=1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--resize-mode", default="letterbox")
    parser.add_argument("--bank-size", type=int, default=30_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: MTD data not found")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    geometry = Geometry(args.image_size, args.resize_mode)
    spec = discover(args.data)
    train_samples, _ = split_holdout(spec.train, 0.2, args.seed)  # same 80% STPM trains on
    train = load_set(train_samples, geometry, progress=False)
    test = load_set(spec.test, geometry, with_masks=True, progress=False)
    teacher = create_backbone(args.backbone, out_strides=(8, 16))
    bank = pooled_features(teacher, train).permute(0, 2, 3, 1).flatten(0, 2)
    bank = bank[torch.randperm(len(bank))[:args.bank_size]]
    features = pooled_features(teacher, test)
    n, c, h, w = features.shape
    queries = features.permute(0, 2, 3, 1).reshape(-1, c)
    distance = torch.cat([torch.cdist(queries[i:i + 20_000], bank).amin(dim=1)
                          for i in range(0, len(queries), 20_000)]).view(n, 1, h, w)
    maps = F.interpolate(distance, size=(args.image_size, args.image_size), mode="bilinear",
                         align_corners=False)[:, 0]
    maps = geometry.restore(maps, test.boxes)
    assert test.masks is not None
    masks = test.masks.numpy()
    record = {
        "name": args.name, "command": "python " + " ".join(sys.argv),
        "image_auroc": image_auroc(test.labels, maps.flatten(1).amax(dim=1).numpy()),
        "pixel_auroc": pixel_auroc(masks, maps.numpy()), "aupro": aupro(masks, maps.numpy()),
        "backbone": args.backbone, "image_size": args.image_size,
        "resize_mode": args.resize_mode, "bank_size": len(bank),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = ROOT / "results" / "diagnostics" / f"{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    record["machine"] = describe_machine()
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
