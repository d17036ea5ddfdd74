#!/usr/bin/env bash
# Mutation testing (issue 25, item 1): mutmut 3 over the losses, the step, the codecs, the views, and the
# sampler and split of the reader, against the fast unit tests that cover them (BENCHMARKS.md, Tests).
#
# mutmut is no dependency of the package; install it into the venv first:
#     .venv/bin/pip install mutmut==3.8.1
# Usage: scripts/mutation.sh [mutmut run args]    (PYTHON=... picks the interpreter; MUTATION_DIR the scratch folder)
#
# mutmut copies the package into ./mutants of the folder it runs in and imports it from there. The package
# is the repository root itself (pyproject's package-dir), so it runs in a scratch folder (never the checkout)
# that holds the working tree's files as radio_distill/, plus tests/ and bench/ (for tests that read
# bench/known_features.py). Results, the survivors and why they survive: BENCHMARKS.md, Tests. reader.py is mutated as a file, but only the mutants of the split
# (`is_held_out`, `SampleIds.held_out`) and of `StepSampler` are run: mutmut names each mutant after its
# function, and `mutmut run` takes name patterns.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
dir=${MUTATION_DIR:-/tmp/radio-mutation}

if [ -e "$dir" ] && [ ! -e "$dir/.radio-mutation" ]; then
    echo "$dir exists and is not a scratch folder of this script; set MUTATION_DIR" >&2
    exit 1
fi
rm -rf "$dir"
mkdir -p "$dir/radio_distill"
touch "$dir/.radio-mutation"
cd "$repo"
git ls-files --cached --others --exclude-standard -z -- . ':!tests' ':!.pp' | xargs -0 cp --parents -t "$dir/radio_distill"
git ls-files --cached --others --exclude-standard -z -- tests bench | xargs -0 cp --parents -t "$dir"
cat > "$dir/pyproject.toml" <<'EOF'
[tool.mutmut]
source_paths = ["radio_distill"]
only_mutate = ["radio_distill/train/losses.py", "radio_distill/train/step.py", "radio_distill/store/codecs.py",
               "radio_distill/store/views.py", "radio_distill/store/reader.py"]
also_copy = ["bench"]
# torch is not fork-safe after use: fork each mutant from a server that only imported and collected
process_isolation = "forkserver"
# the unit tests of these modules that need no Ray session and run in well under 10 s
pytest_add_cli_args_test_selection = [
    "tests/train/test_losses.py",
    "tests/train/test_step.py::test_normalise_known_answer",
    "tests/train/test_step.py::test_the_total_loss_of_a_step_by_hand",
    "tests/train/test_step.py::test_phis_needs_the_statistics_of_every_teacher",
    "tests/train/test_step.py::test_the_update_of_a_step_by_hand",
    "tests/train/test_step.py::test_no_weight_decay_on_norms_biases_tokens_and_position_embeddings",
    "tests/train/test_grid.py",
    "tests/train/test_pairing.py::test_each_side_pairs_with_the_closest_entry_of_each_model",
    "tests/train/test_sampler.py",
    "tests/train/test_reader.py::test_split_of_many_ids_at_once_is_is_held_out",
    "tests/train/test_reader.py::test_split_known_answers",
    "tests/cache/test_codecs.py",
    "tests/cache/test_views.py",
]

[tool.pytest.ini_options]
addopts = "--import-mode=importlib -p no:cacheprovider"
testpaths = ["tests"]
EOF

cd "$dir"
start=$(date +%s)
"$py" -m mutmut run "$@" \
    'radio_distill.train.losses.*' 'radio_distill.train.step.*' 'radio_distill.store.codecs.*' \
    'radio_distill.store.views.*' 'radio_distill.store.reader.x_is_held_out*' \
    'radio_distill.store.reader.xǁSampleIdsǁheld_out*' 'radio_distill.store.reader.xǁStepSamplerǁ*'
echo "wall time: $(( $(date +%s) - start )) s"
"$py" -m mutmut results
