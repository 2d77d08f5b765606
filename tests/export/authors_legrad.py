"""Run the authors' released LeGrad (legrad_torch 1.1 on open_clip 2.23.0) on saved inputs.

Executed as a subprocess whose PYTHONPATH puts those two packages first; never imported by the
suite. Usage: python authors_legrad.py JOB.pt OUT.pt, where JOB holds model_name, weights (a state
dict file), pixel_values (B,3,S,S), text_embeds (P,E) and layer_index; for SigLIP also empty_embed
(E,) or None (no correction), set as the wrapper's `empty_embedding` so nothing is downloaded.
An optional model_cfg (a config dict) is registered under model_name first (tiny test models).
"""

import sys

import open_clip
import torch
from legrad import LeWrapper


def main(job_path: str, out_path: str) -> None:
    job = torch.load(job_path)
    if "model_cfg" in job:
        open_clip.factory._MODEL_CONFIGS[job["model_name"]] = job["model_cfg"]
    model = open_clip.create_model(job["model_name"])
    model.load_state_dict(torch.load(job["weights"]))
    model = LeWrapper(model.eval(), layer_index=job["layer_index"])
    if "empty_embed" in job:  # SigLIP: compute_legrad_siglip, one prompt per call (it sums prompts)
        correction = job["empty_embed"] is not None
        if correction:
            model.empty_embedding = job["empty_embed"].reshape(-1, 1)
        maps = [
            model.compute_legrad(
                text_embedding=t[None], image=job["pixel_values"], apply_correction=correction
            )
            for t in job["text_embeds"]
        ]
        torch.save(torch.cat(maps, dim=1).detach(), out_path)  # (B, P, S, S)
        return
    if model.model_type == "coca":  # compute_legrad_coca: one image per call, and it sums prompts
        texts = job["text_embeds"]
        maps = [
            torch.cat([model.compute_legrad(text_embedding=t[None], image=img[None]) for t in texts], 1)
            for img in job["pixel_values"]
        ]
        torch.save(torch.cat(maps).detach(), out_path)
        return
    maps = [
        model.compute_legrad(text_embedding=job["text_embeds"], image=img[None])
        for img in job["pixel_values"]
    ]
    torch.save(torch.cat(maps).detach(), out_path)  # (B, P, S, S): their code runs one image at a time


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
