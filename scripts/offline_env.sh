# Source this to run notebooks on a machine without Jupyter or network access, from wheels in .whl/
# (downloaded beforehand with `pip download`): `source scripts/offline_env.sh`.
T=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --target "$T" .whl/*.whl
for mod in matplotlib tqdm PIL; do
  python3 -c "import $mod" 2>/dev/null || NEED_EXTRA=1
done
if [ -n "${NEED_EXTRA:-}" ] && ls .whl/extra/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target "$T/extra" .whl/extra/*.whl
  export PYTHONPATH="$T/extra"
fi
export PYTHONPATH="$T:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$T/bin:$PATH" PYTHONUNBUFFERED=1
python3 -m ipykernel install --user --name python3 >/dev/null
