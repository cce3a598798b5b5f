"""Read Caffe/DeepLab prototxts and .caffemodel(.h5) weights without Caffe."""
