"""Writes a tiny fixture in the released SemAlign-MS-Subjects200K layout for the importer's test:

  data/train-00000.parquet   Subjects200K rows: image {bytes, path} (two panels, 1056 x 528),
                             collection, quality_assessment, description {item, category,
                             description_0, description_1}
  mask/{uid}.png             target subject masks
  coord/dift/{uid}_ref0.pt   int64 [4096, 2]: target patch n (64 x 64 grid) -> (y, x) of the
  coord/geoaware/{uid}_ref0.pt   matching reference patch, saved with torch.save
  uids.jsonl                 {"file", "row", "uid"} computed as the official loader does
  expected_512.json          per kept uid, the official pairs [(ref token, target token)] of a
  expected_1024.json         run at 512 px (32 x 32 tokens) and at 1024 px (64 x 64 tokens)

The expected pairs come from a re-implementation, in torch, of what the official dataset does
(my_datasets/Subject200k_dataset.py @c5cc7c6: transform_mask, the bilinear resize of the
coordinate fields to tgt_size // 16 with .long(), and build_ref2tgt_mapping), written from
reading it; the importer's Rust code must reproduce it exactly.

uid = sha256(f"{item}_{description_0}_{h8}"), h8 = sha256 of the target crop saved as PNG by
Pillow (first 8 hex digits), as in the official dataset code. Usage (from the repo root, with a
Python that has torch, Pillow and pyarrow):
    python ci/subjects200k_fixture.py datasets/tests/fixtures/subjects200k
"""
import hashlib
import io
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

out = sys.argv[1]
for d in ["data", "mask", "coord/dift", "coord/geoaware"]:
    os.makedirs(os.path.join(out, d), exist_ok=True)

PAD, SIZE = 8, 512


def two_panel(colour, tgt_box, ref_box):
    img = Image.new("RGB", (2 * SIZE + 4 * PAD, SIZE + 2 * PAD), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = tgt_box
    d.rectangle([PAD + x0, PAD + y0, PAD + x1 - 1, PAD + y1 - 1], fill=colour)
    x0, y0, x1, y1 = ref_box
    d.rectangle([SIZE + 2 * PAD + x0, PAD + y0, SIZE + 2 * PAD + x1 - 1, PAD + y1 - 1], fill=colour)
    return img


def png_bytes(img):
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def uid_of(img, item, desc0):
    tgt = img.crop((PAD, PAD, SIZE + PAD, SIZE + PAD))
    h8 = hashlib.sha256(png_bytes(tgt)).hexdigest()[:8]
    return hashlib.sha256(f"{item}_{desc0}_{h8}".encode("utf-8")).hexdigest()


def coords(tgt_box, ref_box):
    """Target patches inside the box map to the reference patch at the same box-relative place."""
    c = torch.zeros(4096, 2, dtype=torch.int64)
    tx0, ty0, tx1, ty1 = [v // 8 for v in tgt_box]
    rx0, ry0, rx1, ry1 = [v // 8 for v in ref_box]
    for n in range(4096):
        y, x = divmod(n, 64)
        u = (x - tx0) / max(tx1 - tx0, 1)
        v = (y - ty0) / max(ty1 - ty0, 1)
        ry = min(63, max(0, int(ry0 + v * (ry1 - ry0))))
        rx = min(63, max(0, int(rx0 + u * (rx1 - rx0))))
        c[n] = torch.tensor([ry, rx])
    return c


def resize_short_side(img, size, resample):
    """torchvision Resize(int) on a PIL image: the short side to `size`, the long one floored."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), resample)


def to_tensor(img):
    """torchvision ToTensor for 8-bit PIL images: [C, H, W] in [0, 1]."""
    a = np.array(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255)


def build_ref2tgt_mapping(dift, geo, mask, tgt_patch_size, ref_patch_size):
    valid = torch.all(dift == geo, dim=1)
    mask_patch = F.interpolate(mask.unsqueeze(0), size=(tgt_patch_size, tgt_patch_size),
                               mode="nearest")[0, 0]
    keep = valid & (mask_patch.reshape(-1) > 0)
    keep_idx = torch.arange(dift.shape[0])[keep]
    ref = (dift[keep_idx] * ref_patch_size) // 64
    ref_idx = ref[:, 0] * ref_patch_size + ref[:, 1]
    out = {}
    for r, t in zip(ref_idx.tolist(), keep_idx.tolist()):
        if r not in out:
            out[r] = t
    return out


def resize_field(c, new):
    c = c.reshape(1, 64, 64, 2).permute(0, 3, 1, 2).float()
    c = F.interpolate(c, size=(new, new), mode="bilinear", align_corners=False)
    return c.permute(0, 2, 3, 1).reshape(new * new, 2).long()


def official_pairs(dift, geo, mask_img, tgt_size, ref_size):
    """Subjects200K.__getitem__'s mask, coordinate resizing and mapping, as sorted pairs."""
    if mask_img is None:
        mask = torch.ones((1, tgt_size, tgt_size), dtype=torch.uint8)
    else:
        m = resize_short_side(mask_img, tgt_size, Image.NEAREST)
        mask = (to_tensor(m) > 0.5).to(torch.uint8)
    new = tgt_size // 16
    if new != 64:
        dift, geo = resize_field(dift, new), resize_field(geo, new)
    return sorted(build_ref2tgt_mapping(dift, geo, mask, new, ref_size // 16).items())


def jittered(c):
    """A less regular field: +1 on x at scattered patches (values stay on the grid)."""
    c = c.clone()
    for n in range(4096):
        y, x = divmod(n, 64)
        if (7 * x + 3 * y) % 5 == 0:
            c[n, 1] = min(63, int(c[n, 1]) + 1)
    return c


def disagreeing(dift):
    """GeoAware unlike DIFT in ways the 32 grid sees differently: within some 2x2 blocks two
    patches swap (the block's average is unchanged: it agrees at 512 px, not at 1024), in
    others one patch is off by one (it disagrees at both, or only at 1024 when truncation hides
    it)."""
    geo = dift.clone()
    for by in range(32):
        for bx in range(32):
            a, b = (2 * by) * 64 + 2 * bx, (2 * by) * 64 + 2 * bx + 1
            if (by + bx) % 3 == 0:
                geo[[a, b]] = geo[[b, a]]
            elif (5 * by + bx) % 7 == 1:
                geo[b, 0] = min(63, int(geo[b, 0]) + 1)
    return geo


rows = [
    # (collection, quality, item, colour, target box, ref box, mask?, coords?); mask "rgb": an
    # RGB mask whose green channel is on everywhere (only its red channel is the mask)
    ("collection_2", (5, 5, 5), "red mug", (200, 30, 30), (96, 128, 320, 352), (128, 96, 448, 416), True, True),
    ("collection_1", (5, 5, 5), "blue ball", (30, 30, 200), (0, 0, 256, 256), (0, 0, 256, 256), True, True),
    ("collection_2", (5, 5, 4), "green box", (30, 200, 30), (0, 0, 256, 256), (0, 0, 256, 256), True, True),
    ("collection_2", (5, 5, 5), "yellow book", (220, 200, 40), (256, 64, 480, 288), (64, 64, 448, 448), False, True),
    ("collection_2", (5, 5, 5), "purple vase", (140, 40, 170), (64, 64, 192, 448), (160, 32, 352, 480), True, False),
    ("collection_2", None, "teal lamp", (30, 160, 160), (0, 0, 256, 256), (0, 0, 256, 256), True, True),
    ("collection_2", (5, 6, 5), "orange cup", (240, 140, 20), (100, 120, 333, 411), (40, 72, 472, 440), True, "rough"),
    ("collection_2", (6, 5, 5), "pink hat", (240, 120, 180), (52, 36, 300, 250), (20, 20, 500, 490), "rgb", "rough"),
]
records, uids = [], []
expected = {512: {}, 1024: {}}
for i, (coll, q, item, colour, tbox, rbox, with_mask, with_coords) in enumerate(rows):
    img = two_panel(colour, tbox, rbox)
    desc0 = f"a {item} on a white table"
    uid = uid_of(img, item, desc0)
    uids.append({"file": "train-00000.parquet", "row": i, "uid": uid})
    records.append({
        "image": {"bytes": png_bytes(img), "path": f"{i}.png"},
        "collection": coll,
        "quality_assessment": None if q is None else {
            "compositeStructure": q[0], "objectConsistency": q[1], "imageQuality": q[2]},
        "description": {"item": item, "category": "objects", "description_0": desc0,
                        "description_1": f"a {item} alone"},
    })
    kept = coll == "collection_2" and q is not None and min(q) >= 5
    if not kept:
        continue  # the importer filters these rows before looking for their files
    mask = None
    if with_mask == "rgb":
        mask = Image.new("RGB", (SIZE, SIZE), (0, 255, 0))
        ImageDraw.Draw(mask).rectangle([tbox[0], tbox[1], tbox[2] - 1, tbox[3] - 1], fill=(255, 255, 0))
    elif with_mask:
        mask = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(mask).rectangle([tbox[0], tbox[1], tbox[2] - 1, tbox[3] - 1], fill=255)
    if mask is not None:
        mask.save(os.path.join(out, "mask", f"{uid}.png"))
    if with_coords:
        dift = coords(tbox, rbox)
        if with_coords == "rough":
            dift = jittered(dift)
            geo = disagreeing(dift)
        else:
            geo = dift.clone()
            geo[(tbox[1] // 8 + 1) * 64 + tbox[0] // 8 + 1] += 1  # one patch where the matchers disagree
        torch.save(dift, os.path.join(out, "coord/dift", f"{uid}_ref0.pt"))
        torch.save(geo, os.path.join(out, "coord/geoaware", f"{uid}_ref0.pt"))
        for size in (512, 1024):
            expected[size][uid] = official_pairs(dift, geo, mask, size, size)
    else:
        for size in (512, 1024):
            expected[size][uid] = []

pq.write_table(pa.Table.from_pylist(records), os.path.join(out, "data", "train-00000.parquet"))
with open(os.path.join(out, "uids.jsonl"), "w") as f:
    for u in uids:
        f.write(json.dumps(u) + "\n")
for size in (512, 1024):
    with open(os.path.join(out, f"expected_{size}.json"), "w") as f:
        json.dump(expected[size], f)
print(f"wrote {len(records)} rows to {out}")
