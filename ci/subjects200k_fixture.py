"""Writes a tiny fixture in the released SemAlign-MS-Subjects200K layout for the importer's test:

  data/train-00000.parquet   Subjects200K rows: image {bytes, path} (two panels, 1056 x 528),
                             collection, quality_assessment, description {item, category,
                             description_0, description_1}
  mask/{uid}.png             target subject masks
  coord/dift/{uid}_ref0.pt   int64 [4096, 2]: target patch n (64 x 64 grid) -> (y, x) of the
  coord/geoaware/{uid}_ref0.pt   matching reference patch, saved with torch.save
  uids.jsonl                 {"file", "row", "uid"} computed as the official loader does
  expected.json              per kept uid, the official build_ref2tgt_mapping at 1024 px

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

import pyarrow as pa
import pyarrow.parquet as pq
import torch
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


def official_mapping(dift, geo, mask64):
    """build_ref2tgt_mapping at tgt = ref = 1024 px (64 x 64 tokens, no resizing)."""
    keep = (dift == geo).all(dim=1) & (mask64.reshape(-1) > 0)
    out = {}
    for n in torch.arange(4096)[keep].tolist():
        y, x = dift[n].tolist()
        r = y * 64 + x
        if r not in out:
            out[r] = n
    return sorted(out.items())


rows = [
    # (collection, quality, item, colour, target box, ref box, mask?, coords?)
    ("collection_2", (5, 5, 5), "red mug", (200, 30, 30), (96, 128, 320, 352), (128, 96, 448, 416), True, True),
    ("collection_1", (5, 5, 5), "blue ball", (30, 30, 200), (0, 0, 256, 256), (0, 0, 256, 256), True, True),
    ("collection_2", (5, 5, 4), "green box", (30, 200, 30), (0, 0, 256, 256), (0, 0, 256, 256), True, True),
    ("collection_2", (5, 5, 5), "yellow book", (220, 200, 40), (256, 64, 480, 288), (64, 64, 448, 448), False, True),
    ("collection_2", (5, 5, 5), "purple vase", (140, 40, 170), (64, 64, 192, 448), (160, 32, 352, 480), True, False),
    ("collection_2", None, "teal lamp", (30, 160, 160), (0, 0, 256, 256), (0, 0, 256, 256), True, True),
]
records, uids, expected = [], [], {}
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
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle([tbox[0], tbox[1], tbox[2] - 1, tbox[3] - 1], fill=255)
    if with_mask:
        mask.save(os.path.join(out, "mask", f"{uid}.png"))
    if with_coords:
        dift = coords(tbox, rbox)
        geo = dift.clone()
        geo[(tbox[1] // 8 + 1) * 64 + tbox[0] // 8 + 1] += 1  # one patch where the matchers disagree
        torch.save(dift, os.path.join(out, "coord/dift", f"{uid}_ref0.pt"))
        torch.save(geo, os.path.join(out, "coord/geoaware", f"{uid}_ref0.pt"))
        m = mask if with_mask else Image.new("L", (SIZE, SIZE), 255)
        m64 = torch.tensor(list(m.resize((64, 64), Image.NEAREST).tobytes())).reshape(64, 64)
        expected[uid] = official_mapping(dift, geo, m64)
    else:
        expected[uid] = []

pq.write_table(pa.Table.from_pylist(records), os.path.join(out, "data", "train-00000.parquet"))
with open(os.path.join(out, "uids.jsonl"), "w") as f:
    for u in uids:
        f.write(json.dumps(u) + "\n")
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump(expected, f)
print(f"wrote {len(records)} rows to {out}")
