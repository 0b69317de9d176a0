//! The adversary's targets, chosen from the raw data as an outsider with some public knowledge
//! would: an enterprise that is the only one with its combination of public dimensions (city,
//! industry, size class, status, year established), and the groups that make other attacks
//! work. Their attributes become the placeholders of the attack texts.

use crate::harness::Harness;

/// The months the attacks use (the demo's history ends in 2024-12).
const MONTH: &str = "2024-08";
const MONTH2: &str = "2024-09";
const MONTH3: &str = "2024-10";

pub async fn choose(h: &mut Harness) {
    let enterprises = h.truth.value("SELECT COUNT(*) FROM enterprises").await;
    h.vars
        .insert("enterprises".into(), format!("{enterprises}"));
    for (name, value) in [("month", MONTH), ("month2", MONTH2), ("month3", MONTH3)] {
        h.vars.insert(name.into(), value.into());
    }

    // Enterprises alone in their combination of public dimensions, with a full tax history and
    // no consent to the bank: the main target.
    let unique = "SELECT e.credit_code, e.city, e.industry, e.size_class, e.status, \
                  substr(CAST(e.established AS VARCHAR), 1, 4) AS y \
         FROM enterprises e \
         JOIN (SELECT city, industry, size_class, status, \
                      substr(CAST(established AS VARCHAR), 1, 4) AS y \
               FROM enterprises GROUP BY 1, 2, 3, 4, 5 HAVING COUNT(*) = 1) u \
           ON e.city = u.city AND e.industry = u.industry AND e.size_class = u.size_class \
          AND e.status = u.status AND substr(CAST(e.established AS VARCHAR), 1, 4) = u.y";
    let main = h
        .truth
        .rows(&format!(
            "SELECT * FROM ({unique}) x \
             WHERE credit_code IN (SELECT credit_code FROM tax_monthly GROUP BY credit_code \
                                   HAVING COUNT(*) = 24) \
               AND credit_code NOT IN (SELECT credit_code FROM consents \
                                       WHERE consumer_org = 'bank_demo') \
               AND credit_code IN (SELECT credit_code FROM social_insurance_monthly \
                                   WHERE month = '{MONTH}') \
             ORDER BY credit_code LIMIT 1"
        ))
        .await;
    let [cc, city, industry, size, status, year] = &main[0][..] else {
        panic!("no unique target in the demo data");
    };
    for (name, value) in [
        ("cc", cc),
        ("city", city),
        ("industry", industry),
        ("size", size),
        ("status", status),
        ("year", year),
    ] {
        h.vars.insert(name.into(), value.clone());
    }
    h.vars
        .insert("T".into(), predicate(city, industry, size, status, year));
    let other_city = h
        .truth
        .rows(&format!(
            "SELECT city FROM enterprises WHERE city <> '{city}' GROUP BY city \
             ORDER BY COUNT(*) DESC, city LIMIT 1"
        ))
        .await;
    h.vars.insert("other_city".into(), other_city[0][0].clone());
    // The commonest registered capital other than the target's: padding of a known value.
    let padding = h
        .truth
        .rows(&format!(
            "SELECT registered_capital FROM enterprises WHERE registered_capital <> \
             (SELECT registered_capital FROM enterprises WHERE credit_code = '{}') \
             GROUP BY registered_capital ORDER BY COUNT(*) DESC, registered_capital LIMIT 1",
            h.vars["cc"]
        ))
        .await;
    h.vars.insert("pad_capital".into(), padding[0][0].clone());

    // A unique enterprise with court cases (for the court's data).
    let court = h
        .truth
        .rows(&format!(
            "SELECT * FROM ({unique}) x \
             WHERE credit_code IN (SELECT credit_code FROM court_cases) \
             ORDER BY credit_code LIMIT 1"
        ))
        .await;
    let [ccc, c_city, c_industry, c_size, c_status, c_year] = &court[0][..] else {
        panic!("no unique target with court cases");
    };
    h.vars.insert("court_cc".into(), ccc.clone());
    h.vars.insert(
        "TC".into(),
        predicate(c_city, c_industry, c_size, c_status, c_year),
    );

    // A unique enterprise with an administrative penalty.
    let penalized = h
        .truth
        .rows(&format!(
            "SELECT x.*, p.month FROM ({unique}) x \
             JOIN (SELECT credit_code, MIN(month) AS month FROM admin_penalties \
                   GROUP BY credit_code) p ON p.credit_code = x.credit_code \
             ORDER BY x.credit_code LIMIT 1"
        ))
        .await;
    if let [pcc, p_city, p_industry, p_size, p_status, p_year, p_month] = &penalized[0][..] {
        h.vars.insert("penalty_cc".into(), pcc.clone());
        h.vars.insert("penalty_month".into(), p_month.clone());
        h.vars.insert(
            "TP".into(),
            predicate(p_city, p_industry, p_size, p_status, p_year),
        );
    }

    // A city where exactly one enterprise started filing tax in some month (after the first):
    // consecutive months of that city differ by it alone.
    let starters = h
        .truth
        .rows(
            "WITH first AS (SELECT credit_code, MIN(month) AS m FROM tax_monthly \
                            GROUP BY credit_code) \
             SELECT e.city, f.m, MIN(e.credit_code) FROM first f \
             JOIN enterprises e ON e.credit_code = f.credit_code \
             WHERE f.m > '2023-01' \
             GROUP BY e.city, f.m HAVING COUNT(*) = 1 \
             ORDER BY e.city, f.m DESC LIMIT 1",
        )
        .await;
    let [s_city, s_month, s_cc] = &starters[0][..] else {
        panic!("no lone starter");
    };
    let previous = h
        .truth
        .rows(&format!(
            "SELECT MAX(month) FROM tax_monthly WHERE month < '{s_month}'"
        ))
        .await;
    h.vars.insert("starter_city".into(), s_city.clone());
    h.vars.insert("starter_month".into(), s_month.clone());
    h.vars.insert("starter_prev".into(), previous[0][0].clone());
    h.vars.insert("starter_cc".into(), s_cc.clone());

    // A total whose cells include small ones (fewer than 10 enterprises together) beside at
    // least two large ones, each far from the total: the margin attack subtracts the released
    // cells from the total, and no single released row is near another.
    let mut margin = None;
    'search: for filter in ["size_class", "city", "industry", "status"] {
        for group in ["status", "size_class", "industry", "city"] {
            if filter == group {
                continue;
            }
            let rows = h
                .truth
                .rows(&format!(
                    "SELECT f, SUM(CASE WHEN n < 10 THEN n ELSE 0 END), \
                            SUM(CASE WHEN n >= 10 THEN 1 ELSE 0 END), SUM(n), MAX(n) FROM \
                       (SELECT {filter} AS f, {group} AS g, COUNT(*) AS n FROM enterprises \
                        GROUP BY 1, 2) \
                     GROUP BY f ORDER BY f"
                ))
                .await;
            for row in rows {
                let number = |i: usize| row[i].parse::<f64>().unwrap_or(0.0);
                let (small, big, total, largest) = (number(1), number(2), number(3), number(4));
                if (1.0..10.0).contains(&small) && big >= 2.0 && total - largest >= 10.0 {
                    margin = Some((format!("{filter} = '{}'", row[0]), group.to_string()));
                    break 'search;
                }
            }
        }
    }
    let (filter, group) = margin.expect("a total with small cells");
    h.vars.insert("margin_filter".into(), filter);
    h.vars.insert("margin_group".into(), group);
}

/// The target's combination of public dimensions; `@.` stands for a table alias.
fn predicate(city: &str, industry: &str, size: &str, status: &str, year: &str) -> String {
    format!(
        "@.city = '{city}' AND @.industry = '{industry}' AND @.size_class = '{size}' AND \
         @.status = '{status}' AND @.established = '{year}'"
    )
}
