//! A bounded map of recently seen ids: the oldest is forgotten first, so memory stays fixed.

use std::collections::{HashMap, VecDeque};

/// Remembers up to `capacity` ids, each with a value (e.g. a fingerprint of what it carried).
pub struct Recent<V> {
    capacity: usize,
    order: VecDeque<String>,
    map: HashMap<String, V>,
}

/// Remembers up to `capacity` ids.
pub type RecentIds = Recent<()>;

impl<V> Recent<V> {
    /// An empty set remembering at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            map: HashMap::new(),
        }
    }

    /// True if `id` is remembered.
    pub fn contains(&self, id: &str) -> bool {
        self.map.contains_key(id)
    }

    /// The value remembered with `id`.
    pub fn get(&self, id: &str) -> Option<&V> {
        self.map.get(id)
    }

    /// Remembers `id` with `value` (an id already remembered keeps its first value and place),
    /// forgetting the oldest if full.
    pub fn insert_with(&mut self, id: String, value: V) {
        if self.capacity == 0 || self.map.contains_key(&id) {
            return;
        }
        self.map.insert(id.clone(), value);
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.map.remove(&old);
        }
    }
}

impl Recent<()> {
    /// Remembers `id`, forgetting the oldest if full.
    pub fn insert(&mut self, id: String) {
        self.insert_with(id, ());
    }
}

#[cfg(test)]
mod tests {
    use super::{Recent, RecentIds};

    #[test]
    fn forgets_the_oldest_beyond_capacity() {
        let mut r = RecentIds::new(2);
        r.insert("a".into());
        r.insert("b".into());
        r.insert("a".into());
        assert!(r.contains("a") && r.contains("b"));
        r.insert("c".into());
        assert!(!r.contains("a") && r.contains("b") && r.contains("c"));
        let mut off = RecentIds::new(0);
        off.insert("x".into());
        assert!(!off.contains("x"));
    }

    #[test]
    fn keeps_the_first_value_of_an_id() {
        let mut r = Recent::new(4);
        r.insert_with("a".into(), 1);
        r.insert_with("a".into(), 2);
        assert_eq!(r.get("a"), Some(&1));
        assert_eq!(r.get("b"), None);
    }
}
