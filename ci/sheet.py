"""Pastes images into one picture, row by row: the ci/ scripts' README pictures.

Usage: python ci/sheet.py OUT.png COLUMNS GAP IMAGE...
Each cell is as large as the largest image; GAP white pixels between columns.
"""
import sys

from PIL import Image


def main(argv):
    if len(argv) < 5:
        sys.exit(__doc__)
    out, cols, gap, files = argv[1], int(argv[2]), int(argv[3]), argv[4:]
    ims = [Image.open(f).convert("RGB") for f in files]
    w = max(im.width for im in ims)
    h = max(im.height for im in ims)
    rows = (len(ims) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h), "white")
    for i, im in enumerate(ims):
        sheet.paste(im, ((i % cols) * (w + gap), (i // cols) * h))
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv)
