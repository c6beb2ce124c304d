"""Image quality as the paper measures it: MATLAB-exact bicubic, BT.601 Y, PSNR and SSIM
(`matlab`), and the paper's benchmark protocol over a data set (`evaluate`).

The evaluation reads image folders and scores a network; training and the service's
benchmark reuse its readers and its LR making.
"""
