import logging

import hypersd  # noqa: F401  (installs the filter)


def test_torchaos_import_notices_are_dropped_and_other_warnings_kept(caplog):
    log = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").warning(
            "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with `torchao`")
        log.warning("int8 weight-only quantization is slow on this device")
    assert [r.getMessage() for r in caplog.records] == ["int8 weight-only quantization is slow on this device"]
