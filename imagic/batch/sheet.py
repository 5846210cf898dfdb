"""A labelled contact sheet: the input, then one row per seed with a column per η."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 160  # small models draw 32 px images: scale them up so a person can see them
MAX_CELL = 512  # outputs at a photo's size: a sheet is for looking over, the images themselves are beside it
LABEL_HEIGHT = 20
PAD = 8
SELECTED_COLOUR = (0, 170, 60)


def contact_sheet(
    input_image: Image.Image, images: dict[tuple[float, int], Image.Image], title: str = "", selection=None
) -> Image.Image:
    """Grid of `images` keyed by (η, seed), the input at the top left, `title` above; the selected output
    (an `imagic.selection.Selection`) framed in green, or the needs-review reason under the title."""
    if selection is not None and selection.verdict != "selected":
        title = f"{title}  [needs review: {selection.reason}]" if title else f"[needs review: {selection.reason}]"
    etas = sorted({eta for eta, _ in images})
    seeds = sorted({seed for _, seed in images})
    cell = min(max(MIN_CELL, input_image.width), MAX_CELL)
    cell_height = round(cell * input_image.height / input_image.width)  # the input's aspect ratio
    font = ImageFont.load_default()
    title_lines = textwrap.wrap(title, width=max(20, (cell + PAD) * (len(etas) + 1) // 7)) if title else []
    header = len(title_lines) * LABEL_HEIGHT + (PAD if title_lines else 0)
    columns, rows = len(etas) + 1, len(seeds)
    width = PAD + columns * (cell + PAD)
    height = header + PAD + rows * (cell_height + LABEL_HEIGHT + PAD)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((PAD, PAD + i * LABEL_HEIGHT), line, fill="black", font=font)

    def put(image: Image.Image, column: int, row: int, label: str) -> None:
        resample = Image.Resampling.NEAREST if image.width < cell else Image.Resampling.LANCZOS
        x = PAD + column * (cell + PAD)
        y = header + PAD + row * (cell_height + LABEL_HEIGHT + PAD)
        sheet.paste(image.convert("RGB").resize((cell, cell_height), resample), (x, y))
        draw.text((x, y + cell_height + 4), label, fill="black", font=font)

    put(input_image, 0, 0, "input")
    for row, seed in enumerate(seeds):
        for column, eta in enumerate(etas, start=1):
            if (eta, seed) in images:
                chosen = selection is not None and (selection.eta, selection.seed) == (eta, seed)
                put(images[(eta, seed)], column, row, f"eta={eta:g}  seed={seed}" + ("  SELECTED" if chosen else ""))
                if chosen:
                    x, y = PAD + column * (cell + PAD), header + PAD + row * (cell_height + LABEL_HEIGHT + PAD)
                    draw.rectangle((x - 4, y - 4, x + cell + 3, y + cell_height + 3), outline=SELECTED_COLOUR,
                                   width=4)
    return sheet
