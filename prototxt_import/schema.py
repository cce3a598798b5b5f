"""Our own protobuf schema for the subset of ``caffe.proto`` that DeepLab nets and weights use.

No generated code and no ``protoc``: the schema below is a compact text of our own (one line per
field: ``label type name = number [packed] [default=value]``), turned into a
``FileDescriptorProto`` with :mod:`google.protobuf.descriptor_pb2` and into message classes with
:func:`google.protobuf.message_factory.GetMessageClass`.  Parsing then is the protobuf library's
own (binary: unknown fields are skipped; text: unknown fields are errors).

Field numbers are those of Caffe's ``caffe.proto`` (BVLC) and of DeepLab-v2's fork of it
(``interp_param = 143``, ``seg_accuracy_param = 144``, ``dense_crf_param = 146`` ...).  Where BVLC
and DeepLab-v2 give one number two meanings (143: BVLC ``input_param`` / DeepLab ``interp_param``,
144: ``crop_param`` / ``seg_accuracy_param``) DeepLab's meaning wins, because DeepLab .caffemodel
files are what this package reads; BVLC's ``input_param`` and ``crop_param`` are kept for the
*text* format (where fields are matched by name) under private numbers 9143 / 9144.  In a BVLC
binary file those two parameters are therefore skipped or mis-typed, which does not matter: from a
binary file only layer names, types and blobs are used.

DeepLab-v1's fork (deeplab-public) is read in its legacy ``layers`` form too: its layer types
(``IMAGE_SEG_DATA``, ``INTERP``, ``SEG_ACCURACY``, ``MAT_READ`` / ``MAT_WRITE``, ``DENSE_CRF``, ...), its
``interp_param`` / ``softmaxloss_param`` / ``seg_accuracy_param`` / ``strict_dim`` fields and its atrous
``hole`` / ``hole_h`` / ``hole_w`` convolution fields.  Its numbers are kept where BVLC leaves them free;
where they collide (``IMAGE_SEG_DATA`` 39 = BVLC ``DECONVOLUTION``, ``seg_accuracy_param`` 42 = ``loss_param``,
``hole*`` 17-19 = ``force_nd_im2col`` / ``dilation``) the text names get private numbers 9039, 9042,
9017-9019.  ``strict_dim`` (V1 1003) is carried through the upgrade as the private ``LayerParameter`` field 9003:
``strict_dim: false`` lets weight copying take a blob of the same element count in another shape, as
deeplab-public's ``CopyTrainedLayersFrom`` does.
"""
from __future__ import annotations

import functools
import re

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "caffe"

_SCHEMA = r"""
message BlobShape
  repeated int64 dim = 1 packed
message BlobProto
  optional BlobShape shape = 7
  repeated float data = 5 packed
  repeated float diff = 6 packed
  repeated double double_data = 8 packed
  repeated double double_diff = 9 packed
  optional int32 num = 1 default=0
  optional int32 channels = 2 default=0
  optional int32 height = 3 default=0
  optional int32 width = 4 default=0
message BlobProtoVector
  repeated BlobProto blobs = 1
message FillerParameter
  optional string type = 1 default=constant
  optional float value = 2 default=0
  optional float min = 3 default=0
  optional float max = 4 default=1
  optional float mean = 5 default=0
  optional float std = 6 default=1
  optional int32 sparse = 7 default=-1
  enum VarianceNorm FAN_IN=0 FAN_OUT=1 AVERAGE=2
  optional VarianceNorm variance_norm = 8 default=FAN_IN
enum Phase TRAIN=0 TEST=1
message NetState
  optional Phase phase = 1 default=TEST
  optional int32 level = 2 default=0
  repeated string stage = 3
message NetStateRule
  optional Phase phase = 1
  optional int32 min_level = 2
  optional int32 max_level = 3
  repeated string stage = 4
  repeated string not_stage = 5
message ParamSpec
  optional string name = 1
  enum DimCheckMode STRICT=0 PERMISSIVE=1
  optional DimCheckMode share_mode = 2
  optional float lr_mult = 3 default=1
  optional float decay_mult = 4 default=1
message NetParameter
  optional string name = 1
  repeated string input = 3
  repeated BlobShape input_shape = 8
  repeated int32 input_dim = 4
  optional bool force_backward = 5 default=false
  optional NetState state = 6
  optional bool debug_info = 7 default=false
  repeated LayerParameter layer = 100
  repeated V1LayerParameter layers = 2
message SolverState
  optional int32 iter = 1
  optional string learned_net = 2
  repeated BlobProto history = 3
  optional int32 current_step = 4 default=0
message SolverParameter
  optional string net = 24
  optional NetParameter net_param = 25
  optional string train_net = 1
  repeated string test_net = 2
  optional NetParameter train_net_param = 21
  repeated NetParameter test_net_param = 22
  optional NetState train_state = 26
  repeated NetState test_state = 27
  repeated int32 test_iter = 3
  optional int32 test_interval = 4 default=0
  optional bool test_compute_loss = 19 default=false
  optional bool test_initialization = 32 default=true
  optional float base_lr = 5
  optional int32 display = 6
  optional int32 average_loss = 33 default=1
  optional int32 max_iter = 7
  optional int32 iter_size = 36 default=1
  optional string lr_policy = 8
  optional float gamma = 9
  optional float power = 10
  optional float momentum = 11
  optional float weight_decay = 12
  optional string regularization_type = 29 default=L2
  optional int32 stepsize = 13
  repeated int32 stepvalue = 34
  optional float clip_gradients = 35 default=-1
  optional int32 snapshot = 14 default=0
  optional string snapshot_prefix = 15
  optional bool snapshot_diff = 16 default=false
  enum SnapshotFormat HDF5=0 BINARYPROTO=1
  optional SnapshotFormat snapshot_format = 37 default=BINARYPROTO
  enum SolverMode CPU=0 GPU=1
  optional SolverMode solver_mode = 17 default=GPU
  optional int32 device_id = 18 default=0
  optional int64 random_seed = 20 default=-1
  optional string type = 40 default=SGD
  optional float delta = 31 default=1e-8
  optional float momentum2 = 39 default=0.999
  optional float rms_decay = 38 default=0.99
  optional bool debug_info = 23 default=false
  optional bool snapshot_after_train = 28 default=true
  enum SolverType SGD=0 NESTEROV=1 ADAGRAD=2 RMSPROP=3 ADADELTA=4 ADAM=5
  optional SolverType solver_type = 30 default=SGD
  optional bool layer_wise_reduce = 41 default=true
  repeated string weights = 42
message LayerParameter
  optional string name = 1
  optional string type = 2
  repeated string bottom = 3
  repeated string top = 4
  optional bool strict_dim = 9003 default=true
  optional Phase phase = 10
  repeated float loss_weight = 5
  repeated ParamSpec param = 6
  repeated BlobProto blobs = 7
  repeated bool propagate_down = 11
  repeated NetStateRule include = 8
  repeated NetStateRule exclude = 9
  optional TransformationParameter transform_param = 100
  optional LossParameter loss_param = 101
  optional AccuracyParameter accuracy_param = 102
  optional ArgMaxParameter argmax_param = 103
  optional ConcatParameter concat_param = 104
  optional ContrastiveLossParameter contrastive_loss_param = 105
  optional ConvolutionParameter convolution_param = 106
  optional DataParameter data_param = 107
  optional DropoutParameter dropout_param = 108
  optional DummyDataParameter dummy_data_param = 109
  optional EltwiseParameter eltwise_param = 110
  optional ExpParameter exp_param = 111
  optional HDF5DataParameter hdf5_data_param = 112
  optional HDF5OutputParameter hdf5_output_param = 113
  optional HingeLossParameter hinge_loss_param = 114
  optional ImageDataParameter image_data_param = 115
  optional InfogainLossParameter infogain_loss_param = 116
  optional InnerProductParameter inner_product_param = 117
  optional LRNParameter lrn_param = 118
  optional MemoryDataParameter memory_data_param = 119
  optional MVNParameter mvn_param = 120
  optional PoolingParameter pooling_param = 121
  optional PowerParameter power_param = 122
  optional ReLUParameter relu_param = 123
  optional SigmoidParameter sigmoid_param = 124
  optional SoftmaxParameter softmax_param = 125
  optional SliceParameter slice_param = 126
  optional TanHParameter tanh_param = 127
  optional ThresholdParameter threshold_param = 128
  optional WindowDataParameter window_data_param = 129
  optional PythonParameter python_param = 130
  optional PReLUParameter prelu_param = 131
  optional SPPParameter spp_param = 132
  optional ReshapeParameter reshape_param = 133
  optional LogParameter log_param = 134
  optional FlattenParameter flatten_param = 135
  optional ReductionParameter reduction_param = 136
  optional EmbedParameter embed_param = 137
  optional TileParameter tile_param = 138
  optional BatchNormParameter batch_norm_param = 139
  optional ELUParameter elu_param = 140
  optional BiasParameter bias_param = 141
  optional ScaleParameter scale_param = 142
  optional InterpParameter interp_param = 143
  optional SegAccuracyParameter seg_accuracy_param = 144
  optional MatWriteParameter mat_write_param = 145
  optional DenseCRFParameter dense_crf_param = 146
  optional DomainTransformParameter domain_transform_param = 147
  optional AdaptiveBiasChannelParameter adaptive_bias_channel_param = 148
  optional BiasChannelParameter bias_channel_param = 149
  optional UniqueLabelParameter unique_label_param = 150
  optional MatReadParameter mat_read_param = 151
  optional InputParameter input_param = 9143
  optional CropParameter crop_param = 9144
message TransformationParameter
  optional float scale = 1 default=1
  optional bool mirror = 2 default=false
  optional uint32 crop_size = 3 default=0
  optional string mean_file = 4
  repeated float mean_value = 5
  optional bool force_color = 6 default=false
  optional bool force_gray = 7 default=false
  repeated float scale_factors = 8
  optional uint32 crop_width = 9 default=0
  optional uint32 crop_height = 10 default=0
message LossParameter
  optional int32 ignore_label = 1
  enum NormalizationMode FULL=0 VALID=1 BATCH_SIZE=2 NONE=3
  optional NormalizationMode normalization = 3 default=VALID
  optional bool normalize = 2
message AccuracyParameter
  optional uint32 top_k = 1 default=1
  optional int32 axis = 2 default=1
  optional int32 ignore_label = 3
message AdaptiveBiasChannelParameter
  optional int32 num_iter = 1 default=1
  optional float bg_portion = 2 default=0.2
  optional float fg_portion = 3 default=0.2
  optional bool suppress_others = 4 default=true
  optional float margin_others = 5 default=1e-5
message ArgMaxParameter
  optional bool out_max_val = 1 default=false
  optional uint32 top_k = 2 default=1
  optional int32 axis = 3
message BiasChannelParameter
  optional float bg_bias = 1 default=1
  optional float fg_bias = 2 default=2
  repeated int32 ignore_label = 3
  enum LabelType IMAGE=1 PIXEL=2
  optional LabelType label_type = 4 default=IMAGE
  optional int32 background_label = 6 default=0
message ConcatParameter
  optional int32 axis = 2 default=1
  optional uint32 concat_dim = 1 default=1
message BatchNormParameter
  optional bool use_global_stats = 1
  optional float moving_average_fraction = 2 default=0.999
  optional float eps = 3 default=1e-5
  optional bool update_global_stats = 4 default=false
message BiasParameter
  optional int32 axis = 1 default=1
  optional int32 num_axes = 2 default=1
  optional FillerParameter filler = 3
message ContrastiveLossParameter
  optional float margin = 1 default=1
  optional bool legacy_version = 2 default=false
message ConvolutionParameter
  optional uint32 num_output = 1
  optional bool bias_term = 2 default=true
  repeated uint32 pad = 3
  repeated uint32 kernel_size = 4
  repeated uint32 stride = 6
  repeated uint32 dilation = 18
  optional uint32 pad_h = 9 default=0
  optional uint32 pad_w = 10 default=0
  optional uint32 kernel_h = 11
  optional uint32 kernel_w = 12
  optional uint32 stride_h = 13
  optional uint32 stride_w = 14
  optional uint32 group = 5 default=1
  optional FillerParameter weight_filler = 7
  optional FillerParameter bias_filler = 8
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  optional Engine engine = 15 default=DEFAULT
  optional int32 axis = 16 default=1
  optional bool force_nd_im2col = 17 default=false
  optional uint32 hole = 9017
  optional uint32 hole_h = 9018
  optional uint32 hole_w = 9019
message CropParameter
  optional int32 axis = 1 default=2
  repeated uint32 offset = 2
message DataParameter
  enum DB LEVELDB=0 LMDB=1
  optional string source = 1
  optional uint32 batch_size = 4
  optional uint32 rand_skip = 7 default=0
  optional DB backend = 8 default=LEVELDB
  optional float scale = 2 default=1
  optional string mean_file = 3
  optional uint32 crop_size = 5 default=0
  optional bool mirror = 6 default=false
  optional bool force_encoded_color = 9 default=false
  optional uint32 prefetch = 10 default=4
message DenseCRFParameter
  optional int32 max_iter = 1 default=10
  repeated float pos_xy_std = 2
  repeated float pos_w = 3
  repeated float bi_xy_std = 4
  repeated float bi_rgb_std = 5
  repeated float bi_w = 6
  optional bool output_probability = 7 default=true
message DomainTransformParameter
  optional int32 num_iter = 1 default=3
  optional float spatial_sigma = 2 default=50
  optional float range_sigma = 3 default=5
  optional float min_weight = 4 default=0
message DropoutParameter
  optional float dropout_ratio = 1 default=0.5
message DummyDataParameter
  repeated FillerParameter data_filler = 1
  repeated BlobShape shape = 6
  repeated uint32 num = 2
  repeated uint32 channels = 3
  repeated uint32 height = 4
  repeated uint32 width = 5
message EltwiseParameter
  enum EltwiseOp PROD=0 SUM=1 MAX=2
  optional EltwiseOp operation = 1 default=SUM
  repeated float coeff = 2
  optional bool stable_prod_grad = 3 default=true
message ELUParameter
  optional float alpha = 1 default=1
message EmbedParameter
  optional uint32 num_output = 1
  optional uint32 input_dim = 2
  optional bool bias_term = 3 default=true
  optional FillerParameter weight_filler = 4
  optional FillerParameter bias_filler = 5
message ExpParameter
  optional float base = 1 default=-1
  optional float scale = 2 default=1
  optional float shift = 3 default=0
message FlattenParameter
  optional int32 axis = 1 default=1
  optional int32 end_axis = 2 default=-1
message HDF5DataParameter
  optional string source = 1
  optional uint32 batch_size = 2
  optional bool shuffle = 3 default=false
message HDF5OutputParameter
  optional string file_name = 1
message HingeLossParameter
  enum Norm L1=1 L2=2
  optional Norm norm = 1 default=L1
message ImageDataParameter
  optional string source = 1
  optional bool has_label = 13 default=true
  optional int32 max_labels = 14 default=1
  optional uint32 batch_size = 4 default=1
  optional uint32 rand_skip = 7 default=0
  optional bool shuffle = 8 default=false
  optional uint32 new_height = 9 default=0
  optional uint32 new_width = 10 default=0
  optional bool is_color = 11 default=true
  optional int32 ignore_label = 15 default=255
  enum LabelType NONE=0 IMAGE=1 PIXEL=2
  optional LabelType label_type = 16 default=IMAGE
  optional float scale = 2 default=1
  optional string mean_file = 3
  optional uint32 crop_size = 5 default=0
  optional bool mirror = 6 default=false
  optional string root_folder = 12 default=
message InfogainLossParameter
  optional string source = 1
message InnerProductParameter
  optional uint32 num_output = 1
  optional bool bias_term = 2 default=true
  optional FillerParameter weight_filler = 3
  optional FillerParameter bias_filler = 4
  optional int32 axis = 5 default=1
  optional bool transpose = 6 default=false
message InputParameter
  repeated BlobShape shape = 1
message InterpParameter
  optional int32 height = 1 default=0
  optional int32 width = 2 default=0
  optional int32 zoom_factor = 3 default=1
  optional int32 shrink_factor = 4 default=1
  optional int32 pad_beg = 5 default=0
  optional int32 pad_end = 6 default=0
message LogParameter
  optional float base = 1 default=-1
  optional float scale = 2 default=1
  optional float shift = 3 default=0
message LRNParameter
  optional uint32 local_size = 1 default=5
  optional float alpha = 2 default=1
  optional float beta = 3 default=0.75
  enum NormRegion ACROSS_CHANNELS=0 WITHIN_CHANNEL=1
  optional NormRegion norm_region = 4 default=ACROSS_CHANNELS
  optional float k = 5 default=1
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  optional Engine engine = 6 default=DEFAULT
message MatReadParameter
  optional string prefix = 1
  optional string source = 2 default=
  optional int32 strip = 3 default=0
  optional int32 batch_size = 4 default=1
message MatWriteParameter
  optional string prefix = 1
  optional string source = 2 default=
  optional int32 strip = 3 default=0
  optional int32 period = 4 default=1
message MemoryDataParameter
  optional uint32 batch_size = 1
  optional uint32 channels = 2
  optional uint32 height = 3
  optional uint32 width = 4
message MVNParameter
  optional bool normalize_variance = 1 default=true
  optional bool across_channels = 2 default=false
  optional float eps = 3 default=1e-9
message PoolingParameter
  enum PoolMethod MAX=0 AVE=1 STOCHASTIC=2
  optional PoolMethod pool = 1 default=MAX
  optional uint32 pad = 4 default=0
  optional uint32 pad_h = 9 default=0
  optional uint32 pad_w = 10 default=0
  optional uint32 kernel_size = 2
  optional uint32 kernel_h = 5
  optional uint32 kernel_w = 6
  optional uint32 stride = 3 default=1
  optional uint32 stride_h = 7
  optional uint32 stride_w = 8
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  optional Engine engine = 11 default=DEFAULT
  optional bool global_pooling = 12 default=false
message PowerParameter
  optional float power = 1 default=1
  optional float scale = 2 default=1
  optional float shift = 3 default=0
message PReLUParameter
  optional FillerParameter filler = 1
  optional bool channel_shared = 2 default=false
message PythonParameter
  optional string module = 1
  optional string layer = 2
  optional string param_str = 3 default=
  optional bool share_in_parallel = 4 default=false
message ReductionParameter
  enum ReductionOp SUM=1 ASUM=2 SUMSQ=3 MEAN=4
  optional ReductionOp operation = 1 default=SUM
  optional int32 axis = 2 default=0
  optional float coeff = 3 default=1
message ReLUParameter
  optional float negative_slope = 1 default=0
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  optional Engine engine = 2 default=DEFAULT
message ReshapeParameter
  optional BlobShape shape = 1
  optional int32 axis = 2 default=0
  optional int32 num_axes = 3 default=-1
message ScaleParameter
  optional int32 axis = 1 default=1
  optional int32 num_axes = 2 default=1
  optional FillerParameter filler = 3
  optional bool bias_term = 4 default=false
  optional FillerParameter bias_filler = 5
message SegAccuracyParameter
  enum AccuracyMetric PixelAccuracy=0 ClassAccuracy=1 PixelIOU=2
  optional AccuracyMetric metric = 1 default=PixelAccuracy
  repeated int32 ignore_label = 2
  optional bool reset = 3 default=true
message SigmoidParameter
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  optional Engine engine = 1 default=DEFAULT
message SliceParameter
  optional int32 axis = 3 default=1
  repeated uint32 slice_point = 2
  optional uint32 slice_dim = 1 default=1
message SoftmaxParameter
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  optional Engine engine = 1 default=DEFAULT
  optional int32 axis = 2 default=1
message TanHParameter
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  optional Engine engine = 1 default=DEFAULT
message TileParameter
  optional int32 axis = 1 default=1
  optional int32 tiles = 2
message ThresholdParameter
  optional float threshold = 1 default=0
message UniqueLabelParameter
  optional int32 max_labels = 1
  repeated int32 ignore_label = 2
  repeated float force_label = 3
message WindowDataParameter
  optional string source = 1
  optional float scale = 2 default=1
  optional string mean_file = 3
  optional uint32 batch_size = 4
  optional uint32 crop_size = 5 default=0
  optional bool mirror = 6 default=false
  optional float fg_threshold = 7 default=0.5
  optional float bg_threshold = 8 default=0.5
  optional float fg_fraction = 9 default=0.25
  optional uint32 context_pad = 10 default=0
  optional string crop_mode = 11 default=warp
  optional bool cache_images = 12 default=false
  optional string root_folder = 13 default=
message SPPParameter
  enum PoolMethod MAX=0 AVE=1 STOCHASTIC=2
  optional uint32 pyramid_height = 1
  optional PoolMethod pool = 2 default=MAX
  enum Engine DEFAULT=0 CAFFE=1 CUDNN=2
  optional Engine engine = 6 default=DEFAULT
message V1LayerParameter
  repeated string bottom = 2
  repeated string top = 3
  optional string name = 4
  repeated NetStateRule include = 32
  repeated NetStateRule exclude = 33
  enum LayerType NONE=0 ABSVAL=35 ACCURACY=1 ARGMAX=30 BNLL=2 CONCAT=3 CONTRASTIVE_LOSS=37 CONVOLUTION=4 DATA=5 DECONVOLUTION=39 DROPOUT=6 DUMMY_DATA=32 EUCLIDEAN_LOSS=7 ELTWISE=25 EXP=38 FLATTEN=8 HDF5_DATA=9 HDF5_OUTPUT=10 HINGE_LOSS=28 IM2COL=11 IMAGE_DATA=12 INFOGAIN_LOSS=13 INNER_PRODUCT=14 LRN=15 MEMORY_DATA=29 MULTINOMIAL_LOGISTIC_LOSS=16 MVN=34 POOLING=17 POWER=26 RELU=18 SIGMOID=19 SIGMOID_CROSS_ENTROPY_LOSS=27 SILENCE=36 SOFTMAX=20 SOFTMAX_LOSS=21 SPLIT=22 SLICE=33 TANH=23 WINDOW_DATA=24 THRESHOLD=31 SEG_ACCURACY=40 INTERP=41 PADDING=42 MAT_WRITE=43 MAT_READ=44 DENSE_CRF=45 DOMINANT_CHANNEL=46 BIAS_CHANNEL=47 UNIQUE_LABEL=48 CENSOR_LABEL=49 ADAPTIVE_BIAS_CHANNEL=50 CHANNEL_AGGREGATOR=51 IGNORE_OVERLAY=52 HISTOGRAM=53 RELATIVE_ERROR=54 GAIN_CHANNEL=55 ONEHOT=56 IMAGE_SEG_DATA=9039
  optional LayerType type = 5
  repeated BlobProto blobs = 6
  repeated string param = 1001
  enum DimCheckMode STRICT=0 PERMISSIVE=1
  repeated DimCheckMode blob_share_mode = 1002
  repeated float blobs_lr = 7
  repeated float weight_decay = 8
  repeated float loss_weight = 35
  optional AccuracyParameter accuracy_param = 27
  optional ArgMaxParameter argmax_param = 23
  optional ConcatParameter concat_param = 9
  optional ContrastiveLossParameter contrastive_loss_param = 40
  optional ConvolutionParameter convolution_param = 10
  optional DataParameter data_param = 11
  optional DropoutParameter dropout_param = 12
  optional DummyDataParameter dummy_data_param = 26
  optional EltwiseParameter eltwise_param = 24
  optional ExpParameter exp_param = 41
  optional HDF5DataParameter hdf5_data_param = 13
  optional HDF5OutputParameter hdf5_output_param = 14
  optional HingeLossParameter hinge_loss_param = 29
  optional ImageDataParameter image_data_param = 15
  optional InfogainLossParameter infogain_loss_param = 16
  optional InnerProductParameter inner_product_param = 17
  optional LRNParameter lrn_param = 18
  optional MemoryDataParameter memory_data_param = 22
  optional MVNParameter mvn_param = 34
  optional PoolingParameter pooling_param = 19
  optional PowerParameter power_param = 21
  optional ReLUParameter relu_param = 30
  optional SigmoidParameter sigmoid_param = 38
  optional SoftmaxParameter softmax_param = 39
  optional SliceParameter slice_param = 31
  optional TanHParameter tanh_param = 37
  optional ThresholdParameter threshold_param = 25
  optional WindowDataParameter window_data_param = 20
  optional TransformationParameter transform_param = 36
  optional LossParameter loss_param = 42
  optional InterpParameter interp_param = 43
  optional SoftmaxLossParameter softmaxloss_param = 44
  optional MatWriteParameter mat_write_param = 46
  optional MatReadParameter mat_read_param = 47
  optional PaddingParameter padding_param = 45
  optional DenseCRFParameter dense_crf_param = 48
  optional DominantChannelParameter dominant_channel_param = 49
  optional BiasChannelParameter bias_channel_param = 50
  optional UniqueLabelParameter unique_label_param = 51
  optional AdaptiveBiasChannelParameter adaptive_bias_channel_param = 53
  optional SegAccuracyParameter seg_accuracy_param = 9042
  optional bool strict_dim = 1003 default=true
message SoftmaxLossParameter
  optional string weight_source = 16
  repeated int32 ignore_label = 2
message PaddingParameter
  optional int32 pad_beg = 1 default=0
  optional int32 pad_end = 2 default=0
message DominantChannelParameter
  optional int32 top_k = 1 default=1
"""

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _F.TYPE_DOUBLE, "float": _F.TYPE_FLOAT, "int64": _F.TYPE_INT64,
    "uint64": _F.TYPE_UINT64, "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32,
    "bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES,
}
_LABELS = {"optional": _F.LABEL_OPTIONAL, "repeated": _F.LABEL_REPEATED}
_FIELD_RE = re.compile(r"^(optional|repeated) (\w+) (\w+) = (\d+)((?: packed| default=\S*)*)$")


def _build_file() -> descriptor_pb2.FileDescriptorProto:
    """Turn the compact schema text into a proto2 FileDescriptorProto."""
    fdp = descriptor_pb2.FileDescriptorProto(name="attnscale_caffe_subset.proto",
                                             package=PACKAGE, syntax="proto2")
    # pass 1: where is every enum defined (top level or nested in which message)?
    top_enums: set[str] = set()
    nested_enums: dict[str, set[str]] = {}
    messages: set[str] = set()
    current = None
    for line in _SCHEMA.strip().splitlines():
        parts = line.split()
        if line.startswith("message "):
            current = parts[1]
            messages.add(current)
            nested_enums[current] = set()
        elif line.startswith("enum "):
            top_enums.add(parts[1])
            current = None
        elif parts[0] == "enum":
            nested_enums[current].add(parts[1])
    # pass 2: descriptors
    msg = None
    for line in _SCHEMA.strip().splitlines():
        parts = line.split()
        if line.startswith("message "):
            msg = fdp.message_type.add(name=parts[1])
            continue
        if parts[0] == "enum":
            holder = fdp if not line.startswith(" ") else msg
            enum = holder.enum_type.add(name=parts[1])
            for item in parts[2:]:
                name, number = item.split("=")
                enum.value.add(name=name, number=int(number))
            continue
        m = _FIELD_RE.match(line.strip())
        if m is None:  # pragma: no cover - schema typo
            raise RuntimeError(f"bad schema line: {line!r}")
        label, ftype, name, number, extras = m.groups()
        field = msg.field.add(name=name, number=int(number), label=_LABELS[label])
        if ftype in _SCALARS:
            field.type = _SCALARS[ftype]
        elif ftype in messages:
            field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{ftype}"
        elif ftype in nested_enums[msg.name]:
            field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{msg.name}.{ftype}"
        elif ftype in top_enums:
            field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{ftype}"
        else:  # pragma: no cover - schema typo
            raise RuntimeError(f"unknown type {ftype!r} in schema line {line!r}")
        for extra in extras.split():
            if extra == "packed":
                field.options.packed = True
            elif extra.startswith("default="):
                field.default_value = extra[len("default="):]
    return fdp


@functools.lru_cache(maxsize=None)
def _classes() -> dict[str, type]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_build_file())
    get_class = getattr(message_factory, "GetMessageClass", None)  # protobuf >= 4.21
    if get_class is None:  # pragma: no cover - older protobuf
        get_class = message_factory.MessageFactory(pool).GetPrototype
    out = {}
    for name in ("BlobShape", "BlobProto", "BlobProtoVector", "NetParameter", "SolverParameter", "SolverState",
                 "LayerParameter", "V1LayerParameter", "ParamSpec", "NetState", "NetStateRule"):
        out[name] = get_class(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
    return out


def message_class(name: str) -> type:
    """The generated class of ``caffe.<name>`` (e.g. ``message_class("NetParameter")``)."""
    return _classes()[name]


def NetParameter(**kw):  # noqa: N802 - mirrors the Caffe message name
    return message_class("NetParameter")(**kw)


def SolverParameter(**kw):  # noqa: N802
    return message_class("SolverParameter")(**kw)


def BlobProto(**kw):  # noqa: N802
    return message_class("BlobProto")(**kw)
