"""Running a network on a machine: which device (`device`), which inference engine
(`backend`: eager, channels-last, ONNX Runtime, OpenVINO, torch.compile), and how an
image is cut into crops and put back together (`acs`: the paper's ACS and tiles).

Pure model code: the service's engine builds on these, and nothing here knows HTTP.
"""
