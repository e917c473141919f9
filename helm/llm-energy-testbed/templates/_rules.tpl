{{/* Alert rules, shared by the PrometheusRule and the plain rules-file ConfigMap (promtool-tested). */}}
{{- define "testbed.alertGroups" -}}
{{- $a := .Values.metrics.alerts -}}
- name: llm-energy-testbed
  rules:
    - alert: LLMEnergySLOAttainmentLow
      expr: min without (instance, pod) (llm_energy_slo_attainment_ratio) < {{ .Values.slo.attainmentTarget }}
      for: {{ $a.for }}
      labels:
        severity: warning
      annotations:
        summary: "SLO attainment {{ "{{" }} $value | humanizePercentage {{ "}}" }} is under the {{ .Values.slo.attainmentTarget }} target"
        description: "Fewer requests meet every latency SLO than the target; the controller should raise clocks or lower the batch cap."
    - alert: LLMEnergyTTFTAboveSLO
      expr: >-
        histogram_quantile(0.99, sum by (le) (rate(llm_energy_request_ttft_seconds_bucket[5m])))
        > {{ .Values.slo.ttftP99Seconds }}
      for: {{ $a.for }}
      labels:
        severity: warning
      annotations:
        summary: "p99 time to first token {{ "{{" }} $value | humanizeDuration {{ "}}" }} is over the {{ .Values.slo.ttftP99Seconds }} s SLO"
    - alert: LLMEnergyPerTokenRegression
      expr: >-
        (sum(rate(llm_energy_energy_joules_total[15m])) / sum(rate(llm_energy_tokens_total{kind="generated"}[15m])))
        / (sum(rate(llm_energy_energy_joules_total[15m] offset 1d))
           / sum(rate(llm_energy_tokens_total{kind="generated"}[15m] offset 1d)))
        > {{ $a.energyRegressionRatio }}
      for: {{ $a.for }}
      labels:
        severity: warning
      annotations:
        summary: "Energy per generated token is {{ "{{" }} $value | humanize {{ "}}" }}x what it was a day ago"
        description: "Check the clock, batch cap and load mix; compare with the hardware comparison dashboard."
    - alert: LLMEnergyPowerCounterMissing
      expr: >-
        count by (replica) (llm_energy_tokens_total{kind="generated"})
        unless on (replica) count by (replica) (llm_energy_energy_joules_total)
      for: 5m
      labels:
        severity: critical
      annotations:
        summary: "Replica {{ "{{" }} $labels.replica {{ "}}" }} generates tokens but exports no energy counter"
        description: "No power source is readable on its node (NVML/RAPL permissions or driver); energy per token is unknown."
    - alert: LLMEnergyKVCacheFull
      expr: >-
        max by (replica) (llm_energy_kv_cache_usage_ratio) > {{ $a.kvCacheUsageRatio }}
        and on (replica) max by (replica) (llm_energy_requests_waiting) > 0
      for: {{ $a.for }}
      labels:
        severity: warning
      annotations:
        summary: "Replica {{ "{{" }} $labels.replica {{ "}}" }} has its KV cache {{ "{{" }} $value | humanizePercentage {{ "}}" }} full with requests waiting"
        description: "Requests queue for KV-cache space (none is lost, but TTFT grows): give the engine more KV memory, lower max_model_len, or add replicas."
    - alert: LLMEnergyClocksNotRestored
      expr: >-
        (llm_energy_clock_mhz < 0.98 * max_over_time(llm_energy_clock_mhz[1d]))
        unless on () count(llm_energy_knob_value{knob="clock_mhz"})
      for: {{ $a.for }}
      labels:
        severity: critical
      annotations:
        summary: "{{ "{{" }} $labels.replica {{ "}}" }}/{{ "{{" }} $labels.device {{ "}}" }} runs below its usual clock with no controller holding it"
        description: "The controller is gone but the device clock was not restored; restart the node agent (it restores defaults at start-up)."
{{- end }}
