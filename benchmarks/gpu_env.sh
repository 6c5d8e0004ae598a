# Sourced by the benchmark scripts on the GPU machine: install the wheels carried in .whl/ (msgspec;
# torchtitan's for its rows) into /tmp/site, put them and this checkout on PYTHONPATH, and set the
# CUDA allocator and NCCL settings every table runs with (NVLink multicast off, as the device README
# asks). DRY=1 skips the install.
if [ "${DRY:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-./bench_out}
