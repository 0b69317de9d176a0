SELECT e.credit_code,
       t.revenue_recent, t.revenue_prior, t.vat_recent,
       s.headcount_recent, s.headcount_prior, s.arrears_months,
       h.covered_recent,
       COALESCE(c.defendant_cases, 0) AS defendant_cases,
       COALESCE(c.dishonest, 0) AS dishonest,
       COALESCE(p.penalties, 0) AS penalties
FROM enterprises e
JOIN (SELECT credit_code,
             SUM(CASE WHEN month >= '2024-01' THEN revenue_declared ELSE 0 END) AS revenue_recent,
             SUM(CASE WHEN month < '2024-01' THEN revenue_declared ELSE 0 END) AS revenue_prior,
             SUM(CASE WHEN month >= '2024-01' THEN vat_paid ELSE 0 END) AS vat_recent
      FROM tax_monthly GROUP BY credit_code) t ON e.credit_code = t.credit_code
JOIN (SELECT credit_code,
             AVG(CASE WHEN month >= '2024-01' THEN insured_headcount END) AS headcount_recent,
             AVG(CASE WHEN month < '2024-01' THEN insured_headcount END) AS headcount_prior,
             SUM(CASE WHEN arrears > 0 AND month >= '2024-01' THEN 1 ELSE 0 END) AS arrears_months
      FROM social_insurance_monthly GROUP BY credit_code) s ON e.credit_code = s.credit_code
LEFT JOIN (SELECT credit_code,
                  AVG(CASE WHEN month >= '2024-01' THEN employees_covered END) AS covered_recent
           FROM housing_fund_monthly GROUP BY credit_code) h ON e.credit_code = h.credit_code
LEFT JOIN (SELECT credit_code, COUNT(*) AS defendant_cases,
                  MAX(CASE WHEN dishonest_debtor THEN 1 ELSE 0 END) AS dishonest
           FROM court_cases WHERE role = 'defendant' GROUP BY credit_code) c
       ON e.credit_code = c.credit_code
LEFT JOIN (SELECT credit_code, COUNT(*) AS penalties
           FROM admin_penalties GROUP BY credit_code) p ON e.credit_code = p.credit_code
