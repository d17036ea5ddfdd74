"""The `toy` teachers: small CLIP, DINOv2 and SAM trained on the generated world (`cache/world.py`).

`train_toy_teachers.py` makes them (seeded); `clip.safetensors`, `dinov2.safetensors` and
`sam.safetensors` are its output, loaded by `--teachers toy` through the ordinary weight-file specs;
`scores.json` records each teacher's own score on held-out scenes, the seeds and the wall time.
"""
