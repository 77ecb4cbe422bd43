//! A bounded set of recently seen ids: the oldest is forgotten first, so memory stays fixed.

use std::collections::{HashSet, VecDeque};

/// Remembers up to `capacity` ids.
pub struct RecentIds {
    capacity: usize,
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl RecentIds {
    /// An empty set remembering at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    /// True if `id` is remembered.
    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    /// Remembers `id`, forgetting the oldest if full.
    pub fn insert(&mut self, id: String) {
        if self.capacity == 0 || !self.set.insert(id.clone()) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RecentIds;

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
}
