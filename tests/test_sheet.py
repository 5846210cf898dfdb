from PIL import Image

from imagic.sheet import MIN_CELL, contact_sheet


def test_sheet_has_a_cell_per_image_and_the_input_first():
    images = {(eta, seed): Image.new("RGB", (32, 32), "blue") for eta in (0.5, 1.0, 1.2) for seed in (0, 1)}
    sheet = contact_sheet(Image.new("RGB", (32, 32), "red"), images, title="a blue circle")
    assert sheet.width >= 4 * MIN_CELL and sheet.height >= 2 * MIN_CELL
    colors = {sheet.getpixel((x, y)) for x in range(0, sheet.width, 7) for y in range(0, sheet.height, 7)}
    assert (255, 0, 0) in colors and (0, 0, 255) in colors
    # Input cell is upscaled with nearest neighbour: the whole cell is red.
    left_column = [sheet.getpixel((8 + MIN_CELL // 2, y)) for y in range(sheet.height)]
    assert left_column.count((255, 0, 0)) >= MIN_CELL - 2
