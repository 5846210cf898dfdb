from PIL import Image

from imagic.batch.sheet import MIN_CELL, contact_sheet


def test_sheet_has_a_cell_per_image_and_the_input_first():
    images = {(eta, seed): Image.new("RGB", (32, 32), "blue") for eta in (0.5, 1.0, 1.2) for seed in (0, 1)}
    sheet = contact_sheet(Image.new("RGB", (32, 32), "red"), images, title="a blue circle")
    assert sheet.width >= 4 * MIN_CELL and sheet.height >= 2 * MIN_CELL
    colors = {sheet.getpixel((x, y)) for x in range(0, sheet.width, 7) for y in range(0, sheet.height, 7)}
    assert (255, 0, 0) in colors and (0, 0, 255) in colors
    # Input cell is upscaled with nearest neighbour: the whole cell is red.
    left_column = [sheet.getpixel((8 + MIN_CELL // 2, y)) for y in range(sheet.height)]
    assert left_column.count((255, 0, 0)) >= MIN_CELL - 2


def test_the_selected_output_is_framed_and_a_review_verdict_is_written():
    from imagic.engine.selection import Selection
    from imagic.batch.sheet import SELECTED_COLOUR

    images = {(eta, 0): Image.new("RGB", (32, 32), "blue") for eta in (0.5, 1.0)}
    framed = contact_sheet(Image.new("RGB", (32, 32), "red"), images, selection=Selection("selected", eta=1.0, seed=0))
    plain = contact_sheet(Image.new("RGB", (32, 32), "red"), images)
    colours = lambda sheet: {sheet.getpixel((x, y)) for x in range(sheet.width) for y in range(sheet.height)}  # noqa: E731
    assert SELECTED_COLOUR in colours(framed) and SELECTED_COLOUR not in colours(plain)
    # The frame is around the η=1.0 cell (third column), not the η=0.5 one.
    frame_xs = [x for x in range(framed.width) if framed.getpixel((x, framed.height // 2)) == SELECTED_COLOUR]
    assert frame_xs and min(frame_xs) > 2 * MIN_CELL
    review = contact_sheet(Image.new("RGB", (32, 32), "red"), images,
                           selection=Selection("needs_review", reason="no output edits enough"))
    assert review.size != plain.size or review.tobytes() != plain.tobytes()
