"""Convert img2dataset output (WebDataset tars, or parquet + image folder) into ArrayRecord shards.

    python launch/prepare.py --input 'data/laion/*.tar' --output data/prepared --workers 8
    python launch/prepare.py --input data/cc.parquet --images data/cc_images --output data/prepared

Reruns skip inputs already converted. See dalle3_jax/data/prepare.py for the output layout and
--help for every option; then train with data.source=arrayrecord and
data.arrayrecord_pattern='data/prepared/prepared-*.array_record'.
"""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle3_jax.data.prepare import main  # noqa: E402

if __name__ == "__main__":  # guard: --workers starts spawn processes that re-import this file
    main(sys.argv[1:])
