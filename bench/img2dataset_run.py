"""`python -m bench.img2dataset_run SETTINGS.json RESULT.json`: one img2dataset.download call, timed.

Run as a subprocess of bench.build_speed so that img2dataset, like our builder, pays for its
own interpreter and imports, and so that its worker processes share nothing with the bench
(the image server lives in the bench process). RESULT.json gets the seconds spent inside
`download()` and the seconds the imports took.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    started = time.time()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    settings_path, result_path = argv
    with open(settings_path) as f:
        settings = json.load(f)
    import img2dataset  # noqa: E402 - timed

    imported = time.time()
    img2dataset.download(**settings)
    finished = time.time()
    with open(result_path, "w") as f:
        json.dump({"process_started": started, "import_s": imported - started,
                   "download_started": imported, "download_s": finished - imported}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
