"""The store: its format (`layout`), its codecs, where it lives (`location`: a folder or S3), the build's
lock, the inputs it is built from (`dataset`, `sources`), view boxes, integrity records (`provenance`),
creating and opening it (`group`), `info`/`verify` (`inspect`) and the training reader (`reader`).

Everything here reads or describes a store; the Ray build that writes one lives in `cache/`, and nothing
here imports it.
"""
