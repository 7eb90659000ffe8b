import logging

import hypersd  # noqa: F401  (installs the filter)


def test_torchaos_and_bitsandbytes_import_notices_are_dropped_and_other_warnings_kept(caplog):
    log = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").warning(
            "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with `torchao`")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1", "could not verify publisher trust status")
        log.warning("int8 weight-only quantization is slow on this device")
    assert [r.getMessage() for r in caplog.records] == ["int8 weight-only quantization is slow on this device"]
