// Command estargz-gen turns a layer tar into an eStargz or (stargz-snapshotter
// dialect) zstd:chunked blob with the reference implementation,
// github.com/containerd/stargz-snapshotter/estargz, and prints what an image
// converter would record about the result.  It exists only to produce test
// fixtures for csi-oci (tests/support/lazyfixtures.py); it is built by
// hack/install-deps into .cache/bin/estargz-gen.
//
//	estargz-gen -in layer.tar -out blob [-format estargz|zstdchunked]
//	    [-chunk-size N] [-min-chunk-size N] [-prioritized a,b,c] [-level N]
//	    [-parallelism N]
//
// stdout is one JSON object:
//
//	{"tocDigest", "diffID", "uncompressedSize", "size", "digest",
//	 "mediaType", "missedPrioritized", "annotations"}
//
// "annotations" are the layer descriptor annotations that stargz-snapshotter's
// nativeconverter/estargz and nativeconverter/zstdchunked (v0.19.1) set: the
// TOC digest and the uncompressed size, plus for zstdchunked the manifest
// checksum/position the zstdchunked.Compressor reports through its Metadata
// map (the same map the converter reads).
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
)

const (
	mediaTypeGzip = "application/vnd.oci.image.layer.v1.tar+gzip"
	mediaTypeZstd = "application/vnd.oci.image.layer.v1.tar+zstd"
)

// zstdCompression pairs the zstd:chunked compressor with its decompressor:
// estargz.WithCompression wants both halves.
type zstdCompression struct {
	*zstdchunked.Decompressor
	*zstdchunked.Compressor
}

type result struct {
	TOCDigest         string            `json:"tocDigest"`
	DiffID            string            `json:"diffID"`
	UncompressedSize  int64             `json:"uncompressedSize"`
	Size              int64             `json:"size"`
	Digest            string            `json:"digest"`
	MediaType         string            `json:"mediaType"`
	MissedPrioritized []string          `json:"missedPrioritized"`
	Annotations       map[string]string `json:"annotations"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "estargz-gen: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	in := flag.String("in", "", "input layer: tar (gzip/zstd-compressed tars are accepted too)")
	out := flag.String("out", "", "output blob path")
	format := flag.String("format", "estargz", "estargz or zstdchunked")
	chunkSize := flag.Int("chunk-size", 0, "estargz.WithChunkSize (0: library default, 4 MiB)")
	minChunkSize := flag.Int("min-chunk-size", 0, "estargz.WithMinChunkSize (0: off)")
	prioritized := flag.String("prioritized", "", "comma-separated prioritized files (landmark is added)")
	level := flag.Int("level", 0, "compression level: gzip 0-9 (default 9) or zstd (default 3); only if given")
	parallelism := flag.Int("parallelism", 0, "estargz.WithParallelism (0: library default, GOMAXPROCS)")
	flag.Parse()
	if *in == "" || *out == "" || flag.NArg() != 0 {
		flag.Usage()
		return fmt.Errorf("-in and -out are required, no positional arguments")
	}
	levelSet := false
	flag.Visit(func(f *flag.Flag) {
		if f.Name == "level" {
			levelSet = true
		}
	})

	missed := []string{}
	opts := []estargz.Option{estargz.WithAllowPrioritizeNotFound(&missed)}
	if *chunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(*chunkSize))
	}
	if *minChunkSize > 0 {
		opts = append(opts, estargz.WithMinChunkSize(*minChunkSize))
	}
	if *prioritized != "" {
		opts = append(opts, estargz.WithPrioritizedFiles(strings.Split(*prioritized, ",")))
	}
	if *parallelism > 0 {
		opts = append(opts, estargz.WithParallelism(*parallelism))
	}

	var metadata map[string]string
	mediaType := mediaTypeGzip
	switch *format {
	case "estargz":
		if levelSet {
			opts = append(opts, estargz.WithCompressionLevel(*level))
		}
	case "zstdchunked":
		mediaType = mediaTypeZstd
		zlevel := zstd.SpeedDefault // what nativeconverter/zstdchunked.LayerConvertFunc uses
		if levelSet {
			zlevel = zstd.EncoderLevelFromZstd(*level)
		}
		metadata = map[string]string{}
		opts = append(opts, estargz.WithCompression(&zstdCompression{
			new(zstdchunked.Decompressor),
			&zstdchunked.Compressor{CompressionLevel: zlevel, Metadata: metadata},
		}))
	default:
		return fmt.Errorf("unknown -format %q (estargz or zstdchunked)", *format)
	}

	src, err := os.Open(*in)
	if err != nil {
		return err
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return err
	}
	blob, err := estargz.Build(io.NewSectionReader(src, 0, st.Size()), opts...)
	if err != nil {
		return fmt.Errorf("estargz.Build: %w", err)
	}
	defer blob.Close()

	dst, err := os.Create(*out)
	if err != nil {
		return err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(dst, h), blob)
	if err != nil {
		dst.Close()
		return fmt.Errorf("writing %s: %w", *out, err)
	}
	if err := dst.Close(); err != nil {
		return err
	}
	if err := blob.Close(); err != nil {
		return err
	}
	usize, err := blob.UncompressedSize()
	if err != nil {
		return err
	}

	res := result{
		TOCDigest:         blob.TOCDigest().String(),
		DiffID:            blob.DiffID().String(),
		UncompressedSize:  usize,
		Size:              n,
		Digest:            "sha256:" + hex.EncodeToString(h.Sum(nil)),
		MediaType:         mediaType,
		MissedPrioritized: missed,
		Annotations: map[string]string{
			estargz.TOCJSONDigestAnnotation:         blob.TOCDigest().String(),
			estargz.StoreUncompressedSizeAnnotation: fmt.Sprintf("%d", usize),
		},
	}
	for _, key := range []string{zstdchunked.ManifestChecksumAnnotation, zstdchunked.ManifestPositionAnnotation} {
		if v, ok := metadata[key]; ok {
			res.Annotations[key] = v
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(res)
}
