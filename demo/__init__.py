"""The embedded demo: a LAION-format input that needs no internet, and the build of it.

`python -m pipeline.build_laion_face` with no --input (`make demo`) builds it into out/demo.

- `demo.server`: `ImageServer`, a real HTTP image server on loopback with the faults a web
  crawl meets (dead links, stalls, bombs, redirect loops, opt-outs); the tests use it too.
- `demo.data`: real photos from installed packages, varied the way the web varies them, and
  the LAION-format parquet whose URLs point at the server.
- `demo.build`: starts the server, builds that parquet with `pipeline.build.build`, stops it.

The demo depends on the pipeline, never the other way round: only the command line
(`pipeline/build_laion_face.py`) knows about it.
"""
