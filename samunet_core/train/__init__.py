"""Fine-tuning of the default model (LiteMedSAM) for point prompts and click corrections.

The image encoder stays frozen: every training image is encoded once into the engine's disk cache
(`embeddings.py`), then only the prompt encoder and mask decoder are trained against those cached embeddings
(`loop.py`) with simulated interactive prompts (`prompt_sim.py`). What training changed is stored as a small fp16
delta (`delta.py`) and combined with the packaged base checkpoint at load time (`weights_source.py`).
"""
