.PHONY: install demo test lint
install:
	bash scripts/bootstrap.sh
demo: install
	mkdir -p out
	.venv/bin/samunet segment Resources/Samples/CTChest4.nrrd --prompts Resources/Samples/ctchest_prompts.json --preset lung --output out/CTChest4.seg.nrrd --overlay out/CTChest4_overlay.png
test: install
	.venv/bin/ruff check .
	.venv/bin/python scripts/check_slicer_module.py
	.venv/bin/python -m pytest -q
lint: install
	.venv/bin/ruff check .
