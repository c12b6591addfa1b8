// Command promtext parses Prometheus text exposition format from stdin with Prometheus's
// own parser (github.com/prometheus/common/expfmt) and prints the metric families as
// JSON, so tests can check that what the gateway serves at /metrics is what a Prometheus
// server would read. A parse error exits 1 with the parser's message on stderr.
package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"runtime/debug"
	"sort"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

type bucket struct {
	UpperBound string `json:"le"`
	Count      uint64 `json:"count"`
}

type sample struct {
	Labels  map[string]string `json:"labels"`
	Value   *float64          `json:"value,omitempty"`
	Count   *uint64           `json:"count,omitempty"`
	Sum     *float64          `json:"sum,omitempty"`
	Buckets []bucket          `json:"buckets,omitempty"`
}

type family struct {
	Type    string   `json:"type"`
	Help    string   `json:"help"`
	Samples []sample `json:"samples"`
}

func bound(v float64) string {
	if math.IsInf(v, 1) {
		return "+Inf"
	}
	return fmt.Sprint(v)
}

func convert(m *dto.Metric, kind dto.MetricType) sample {
	s := sample{Labels: map[string]string{}}
	for _, pair := range m.GetLabel() {
		s.Labels[pair.GetName()] = pair.GetValue()
	}
	switch kind {
	case dto.MetricType_COUNTER:
		v := m.GetCounter().GetValue()
		s.Value = &v
	case dto.MetricType_GAUGE:
		v := m.GetGauge().GetValue()
		s.Value = &v
	case dto.MetricType_UNTYPED:
		v := m.GetUntyped().GetValue()
		s.Value = &v
	case dto.MetricType_HISTOGRAM:
		h := m.GetHistogram()
		count, sum := h.GetSampleCount(), h.GetSampleSum()
		s.Count, s.Sum = &count, &sum
		for _, b := range h.GetBucket() {
			s.Buckets = append(s.Buckets, bucket{bound(b.GetUpperBound()), b.GetCumulativeCount()})
		}
	}
	return s
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-version" {
		// The parser's version, as the module was built with it.
		version := "unknown"
		if info, ok := debug.ReadBuildInfo(); ok {
			for _, dep := range info.Deps {
				if dep.Path == "github.com/prometheus/common" {
					version = dep.Version
				}
			}
		}
		fmt.Printf("promtext (github.com/prometheus/common %s)\n", version)
		return
	}
	parser := expfmt.NewTextParser(model.LegacyValidation)
	families, err := parser.TextToMetricFamilies(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out := map[string]family{}
	names := make([]string, 0, len(families))
	for name := range families {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		mf := families[name]
		f := family{Type: mf.GetType().String(), Help: mf.GetHelp(), Samples: []sample{}}
		for _, m := range mf.GetMetric() {
			f.Samples = append(f.Samples, convert(m, mf.GetType()))
		}
		out[name] = f
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetIndent("", " ")
	if err := encoder.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
