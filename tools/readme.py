"""Write README.md from nbs/index.ipynb with nbconvert's Markdown exporter (Quarto, which nbdev_readme needs,
cannot be installed here). Cells marked `#| hide` are left out, and nbdev's directive lines are dropped."""
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

root = Path(__file__).resolve().parents[1]
nb = nbformat.read(root/'nbs'/'index.ipynb', as_version=4)
nb.cells = [c for c in nb.cells if '#| hide' not in c.source]
for c in nb.cells:
    if c.cell_type == 'code': c.source = '\n'.join(l for l in c.source.splitlines() if not l.startswith('#|'))
body, _ = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
text = '<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file. -->\n\n' + body.strip() + '\n'
(root/'README.md').write_text(text)
