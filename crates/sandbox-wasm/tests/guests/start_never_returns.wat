;; expect: wasm-limit wall-time
;; limits: fuel=1000000000000000 wall_ms=300
;; The start function runs at instantiation, before the entry point: it is bounded too.
(module
  (memory (export "memory") 1)
  (@custom "sandbox.manifest" "{\"name\":\"t\",\"purpose\":\"credit_assessment\",\"input\":[\"tax_monthly.credit_code\"]}")
  (func $start (loop $forever (br $forever)))
  (start $start)
  (func (export "run") (param i32) (result i32) (i32.const 0)))
