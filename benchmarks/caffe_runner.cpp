// caffe_runner: runs a Caffe net on inputs read from HDF5 and writes what it computed, for
// benchmarks/caffe_compare.py (attnscale against a real Caffe, blob by blob and gradient by gradient).
//
//   caffe_runner NET.prototxt WEIGHTS|- IN.h5 OUT_PREFIX TRAIN|TEST [TIME_REPS] [float|double]
//   caffe_runner --solve SOLVER.prototxt WEIGHTS IN.h5 OUT_PREFIX ITERS [float|double]
//
// IN.h5 holds one dataset per input blob of the net (data; for a training net label, label_res075, ...).
// Without TIME_REPS (or 0) it runs one forward (and in TRAIN one backward after clearing the parameter
// diffs) and writes OUT_PREFIX_blobs.h5: every blob's data under its name and, in TRAIN, its diff under
// "<name>@diff"; in TRAIN also OUT_PREFIX_params.h5 (Net::ToHDF5 with the diffs: data/<layer>/<i>,
// diff/<layer>/<i>).  With TIME_REPS it prints "forward_ms F backward_ms B" for that many timed passes after
// one untimed one.  "double" runs Net<double>.  --solve builds the solver's training net, copies WEIGHTS into
// it, sets its inputs once (every pass of every iteration sees them) and runs Solver::Step(ITERS); then
// it writes OUT_PREFIX_params.h5 (Net::ToHDF5, the weights after the updates).
//
// Not built by this project: it needs a Caffe with DeepLab-v2's layers (Interp, SpatialProduct), e.g. a
// CPU_ONLY build of DeepLab-v2's Caffe or of a fork that carries its layers.  Against such a build:
//   g++ -O2 -std=c++14 -DCPU_ONLY -I$CAFFE/include -I$CAFFE/build/include -I/usr/include/hdf5/serial \
//       caffe_runner.cpp -L$CAFFE/build/lib -lcaffe -lprotobuf -lglog -lgflags -lhdf5_serial -lhdf5_serial_hl \
//       -lboost_system -lopenblas -o caffe_runner
// (benchmarks/RESULTS.md names the Caffe this project's comparisons ran against.)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "caffe/caffe.hpp"
#include "caffe/util/hdf5.hpp"

namespace {

using caffe::Net;

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

template <typename Dtype>
void load_inputs(Net<Dtype>& net, const char* path) {
  hid_t in = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
  CHECK_GE(in, 0) << "caffe_runner: cannot open " << path;
  for (int i : net.input_blob_indices()) {  // each input reshaped to its dataset (Caffe checks it exists)
    caffe::hdf5_load_nd_dataset(in, net.blob_names()[i].c_str(), 1, 4, net.blobs()[i].get());
  }
  H5Fclose(in);
  net.Reshape();
}

template <typename Dtype>
int run(char** argv, int reps) {
  const bool train = std::string(argv[5]) == "TRAIN";
  Net<Dtype> net(argv[1], train ? caffe::TRAIN : caffe::TEST);
  if (std::string(argv[2]) != "-") net.CopyTrainedLayersFrom(argv[2]);
  load_inputs(net, argv[3]);
  if (reps > 0) {
    net.ForwardPrefilled();
    for (int r = 0; r < reps; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      net.ForwardPrefilled();
      const double f = ms_since(t0);
      double b = 0;
      if (train) {
        net.ClearParamDiffs();
        t0 = std::chrono::steady_clock::now();
        net.Backward();
        b = ms_since(t0);
      }
      printf("forward_ms %.1f backward_ms %.1f\n", f, b);
    }
    return 0;
  }
  Dtype loss = 0;
  net.ForwardPrefilled(&loss);
  if (train) {
    net.ClearParamDiffs();
    net.Backward();
  }
  const std::string prefix(argv[4]);
  hid_t out = H5Fcreate((prefix + "_blobs.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (out < 0) {
    fprintf(stderr, "caffe_runner: cannot write %s_blobs.h5\n", prefix.c_str());
    return 2;
  }
  for (size_t i = 0; i < net.blobs().size(); ++i) {
    const std::string& name = net.blob_names()[i];
    caffe::hdf5_save_nd_dataset(out, name, *net.blobs()[i], false);
    if (train) caffe::hdf5_save_nd_dataset(out, name + "@diff", *net.blobs()[i], true);
  }
  H5Fclose(out);
  if (train) net.ToHDF5(prefix + "_params.h5", true);
  printf("loss %.17g\n", static_cast<double>(loss));
  return 0;
}

template <typename Dtype>
int solve(char** argv) {
  caffe::SolverParameter param;
  caffe::ReadSolverParamsFromTextFileOrDie(argv[2], &param);
  boost::shared_ptr<caffe::Solver<Dtype> > solver(caffe::SolverRegistry<Dtype>::CreateSolver(param));
  Net<Dtype>& net = *solver->net();
  net.CopyTrainedLayersFrom(argv[3]);
  load_inputs(net, argv[4]);
  solver->Step(atoi(argv[6]));
  net.ToHDF5(std::string(argv[5]) + "_params.h5", false);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 7 && std::string(argv[1]) == "--solve") {
    FLAGS_minloglevel = 2;
    google::InitGoogleLogging(argv[0]);
    caffe::Caffe::set_mode(caffe::Caffe::CPU);
    if (argc > 7 && std::string(argv[7]) == "double") return solve<double>(argv);
    return solve<float>(argv);
  }
  if (argc < 6 || argc > 8) {
    fprintf(stderr, "usage: caffe_runner NET.prototxt WEIGHTS|- IN.h5 OUT_PREFIX TRAIN|TEST [TIME_REPS] "
                    "[float|double]\n       caffe_runner --solve SOLVER.prototxt WEIGHTS IN.h5 OUT_PREFIX ITERS "
                    "[float|double]\n");
    return 2;
  }
  FLAGS_minloglevel = 2;  // Caffe's INFO and WARNING lines off; its CHECK failures still print
  google::InitGoogleLogging(argv[0]);
  caffe::Caffe::set_mode(caffe::Caffe::CPU);
  const int reps = argc > 6 ? atoi(argv[6]) : 0;
  if (argc > 7 && std::string(argv[7]) == "double") return run<double>(argv, reps);
  return run<float>(argv, reps);
}
