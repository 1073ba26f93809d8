#!/usr/bin/env bash
# Trains the bundled demo model (jamba_jax/demo/) from scratch on CPU, on the documentation topics
# that ship with every Python install (pydoc_data.topics), and copies it into the package.
#   benchmarks/train_demo.sh [WORK_DIR] [extra `jamba train` flags, e.g. --alpha 1e-5 --steps 100]
# Seeded: the init, the tokenizer and every batch are fixed by --seed.
set -euo pipefail
work=${1:-build/demo}
shift || true
mkdir -p "$work/data"
python - "$work/data" <<'PY'
import pathlib, sys
import pydoc_data.topics
for name, text in sorted(pydoc_data.topics.topics.items()):
    pathlib.Path(sys.argv[1], f"{name}.txt").write_text(text, encoding="utf-8")
PY
jamba train --config jamba-demo --data "$work/data" --out "$work/model" --steps 300 --batch 8 --seq 128 \
    --lr 3e-3 --warmup 30 --scan sequential --save-every 100 --save-dtype bfloat16 --seed 0 "$@"
if [ "$#" -eq 0 ]; then  # only the recipe itself replaces the bundled model
    cp "$work/model/"{config.json,model.safetensors,tokenizer.json,generation_config.json} jamba_jax/demo/
fi
