"""Weights in and out of unclip: Karlo / diffusers models into unclip checkpoints
(`from_diffusers`), and a trained unclip stack into a folder diffusers' `UnCLIPPipeline` loads
(`to_diffusers`). Both read the same link tables (`networks.py`). diffusers and transformers are
needed only for export (the `dev` / `bench` extras); import reads safetensors or torch files."""
