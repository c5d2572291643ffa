"""INT8: calibration (histograms → amax), the calibration file, Q/DQ plans, the legacy calibrator.

How a build makes an INT8 engine (explicit quantization, every TensorRT):

    from trtnet.quant.options import Int8Options, explicit_plan

    plan, calibration, calib_path = explicit_plan(Int8Options(calib=..., calib_images=..., ...),
                                                  tensors, meta, imgsz, engine_path, log)
    defined = define_network(builder, tensors, meta, precision="fp16", quant=plan, ...)
    config = compat.builder_config(builder, compat.BuildOptions(precision="fp16", int8=True, ...))

Modules: `histogram` (AbsHistogram; entropy / percentile / max amax; per-channel weight amax),
`calibration_file` (CalibrationFile JSON, network_hash, read_calibration), `plan` (QuantPlan),
`calibrate` (image loader, TensorHistograms, the CPU pass), `options` (Int8Options, explicit_plan),
`implicit` (TensorRT's entropy or MinMax calibrator and its calibration cache, TensorRT 8.x/10.x).
"""
