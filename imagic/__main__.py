from imagic.cli import app

app(prog_name="imagic")
