# Sourced by benches/compare and benches/peer/*.py runners: makes benches/peer/.venv from the pinned
# requirements.txt beside this file (again whenever it changes) and sets $python. torch from PyPI
# is several GB with its CUDA wheels: this runs once, outside CI.
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
venv=$here/.venv
if [[ ! -x $venv/bin/python ]] || ! cmp -s "$here/requirements.txt" "$venv/requirements.txt"; then
    echo "benches/peer: installing torch into $venv (once; a few GB)" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
        -r "$here/requirements.txt" >&2
    cp -- "$here/requirements.txt" "$venv/requirements.txt"
fi
python=$venv/bin/python
export PYTHONDONTWRITEBYTECODE=1
